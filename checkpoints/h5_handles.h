// h5_handles.h -- RAII ownership of HDF5 ids and the H5_CHECK macro (the HDF5 member of check.h's family).
//
// Every id bmoe opens lives in an H5Handle, so each H5*close runs on every path, exceptions included.
// H5_CHECK(expr) turns a negative hid_t/herr_t into a bmoe::Error naming the call. HDF5's own
// automatic error-stack printing is switched off (h5_silence_errors, called by H5File's openers) so
// a failure is our one-line message, not a page of stack on stderr.
// The small attribute helpers store strings as variable-length UTF-8 (h5py reads them as str) and
// integers as 64-bit little-endian.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <utility>

#include "parallel/check.h"

#define H5_CHECK(expr)                                                                                     \
    ([&]() {                                                                                               \
        auto bmoe_h5_rc_ = (expr);                                                                         \
        if (bmoe_h5_rc_ < 0)                                                                               \
            ::bmoe::fail_call("HDF5", #expr, __FILE__, __LINE__, ::bmoe::checkpoints::h5_error_message()); \
        return bmoe_h5_rc_;                                                                                \
    }())

namespace bmoe::checkpoints {

// Turns off HDF5's automatic error printing (idempotent, process-wide).
void h5_silence_errors();
// The innermost message of HDF5's current error stack (e.g. "file signature not found"), or "failed".
std::string h5_error_message();

// Owns one HDF5 id; Close is the matching H5*close function.
template <herr_t (*Close)(hid_t)>
class H5Handle {
  public:
    H5Handle() = default;
    explicit H5Handle(hid_t id) : id_(id) {}
    H5Handle(const H5Handle&) = delete;
    H5Handle& operator=(const H5Handle&) = delete;
    H5Handle(H5Handle&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)) {}
    H5Handle& operator=(H5Handle&& other) noexcept {
        if (this != &other) {
            reset();
            id_ = std::exchange(other.id_, H5I_INVALID_HID);
        }
        return *this;
    }
    ~H5Handle() { reset(); }

    hid_t get() const { return id_; }
    operator hid_t() const { return id_; }
    bool valid() const { return id_ >= 0; }
    // Closes now; throws when the close itself fails (H5Fclose flushes, so its result matters).
    void close() {
        if (id_ >= 0) H5_CHECK(Close(std::exchange(id_, H5I_INVALID_HID)));
    }
    void reset() {
        if (id_ >= 0) Close(std::exchange(id_, H5I_INVALID_HID));
    }

  private:
    hid_t id_ = H5I_INVALID_HID;
};

using H5File = H5Handle<H5Fclose>;
using H5Group = H5Handle<H5Gclose>;
using H5Dataset = H5Handle<H5Dclose>;
using H5Space = H5Handle<H5Sclose>;
using H5Attr = H5Handle<H5Aclose>;
using H5Type = H5Handle<H5Tclose>;
using H5Plist = H5Handle<H5Pclose>;
using H5Object = H5Handle<H5Oclose>;

// File-access properties for every checkpoint open/create: HDF5's file locking stays on but is
// ignored where the file system does not support it (NFS/Lustre: "unable to lock file, errno = 38").
H5Plist h5_file_access();

// Attributes on any object (file root, group, dataset).
void h5_write_attr(hid_t loc, const std::string& name, const std::string& value);
void h5_write_attr(hid_t loc, const std::string& name, int64_t value);
void h5_write_attr_u64(hid_t loc, const std::string& name, uint64_t value);
bool h5_has_attr(hid_t loc, const std::string& name);
std::string h5_read_attr_string(hid_t loc, const std::string& name);
int64_t h5_read_attr_int(hid_t loc, const std::string& name);
uint64_t h5_read_attr_u64(hid_t loc, const std::string& name);
// True when `path` (e.g. "/optimizer/m/w1") names an existing link, checking each component.
bool h5_path_exists(hid_t file, const std::string& path);

}  // namespace bmoe::checkpoints
