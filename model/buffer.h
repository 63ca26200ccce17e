// buffer.h -- Buffer<T>: RAII owner of n elements of backend memory (host or device).
// Non-copyable, movable. The views handed to ops stay plain pointers (data()).
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "model/backend.h"

namespace bmoe::model {

template <typename T>
class Buffer {
  public:
    Buffer() = default;
    Buffer(Backend* backend, size_t n) : backend_(backend), size_(n) {
        if (n > 0) data_ = static_cast<T*>(backend_->alloc(n * sizeof(T)));
    }
    ~Buffer() { reset(); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& o) noexcept { *this = std::move(o); }
    Buffer& operator=(Buffer&& o) noexcept {
        if (this != &o) {
            reset();
            backend_ = std::exchange(o.backend_, nullptr);
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }

    T* data() { return data_; }
    const T* data() const { return data_; }
    size_t size() const { return size_; }
    size_t bytes() const { return size_ * sizeof(T); }

    // Grows (never shrinks) to at least n elements; contents are NOT preserved.
    void ensure(Backend* backend, size_t n) {
        if (n <= size_ && backend == backend_) return;
        *this = Buffer(backend, n);
    }
    void upload(const std::vector<T>& host) {
        if (!host.empty()) backend_->upload(data_, host.data(), host.size() * sizeof(T));
    }
    std::vector<T> download() const {
        std::vector<T> host(size_);
        if (size_ > 0) backend_->download(host.data(), data_, bytes());
        return host;
    }
    void zero() {
        if (size_ > 0) backend_->zero(data_, bytes());
    }

  private:
    void reset() {
        if (data_ != nullptr) backend_->free(data_);
        data_ = nullptr;
        size_ = 0;
    }
    Backend* backend_ = nullptr;
    T* data_ = nullptr;
    size_t size_ = 0;
};

}  // namespace bmoe::model
