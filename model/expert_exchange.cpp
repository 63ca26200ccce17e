#include "model/expert_exchange.h"

#include "parallel/check.h"

namespace bmoe::model {

ExpertExchange::ExpertExchange(
    parallel::Communicator& ep, int num_experts, Backend* backend, bool force_staging, parallel::Communicator* counts)
    : dispatcher_(ep, num_experts, counts),
      backend_(backend),
      staged_(force_staging || (!backend->is_host() && !ep.device_memory())) {
    BMOE_REQUIRE(!(backend->is_host() && ep.device_memory()), "the ", ep.name(),
                 " communicator moves device memory but the backend is ", backend->name(),
                 ": use --train.backend=cuda or --parallel.comm=mpi");
}

const parallel::DispatchHandle& ExpertExchange::plan(const std::vector<int>& expert_offsets) {
    handle_ = dispatcher_.plan(expert_offsets);
    const size_t L = static_cast<size_t>(handle_.num_local_rows());
    received_to_sorted_.ensure(backend_, L);
    sorted_to_received_.ensure(backend_, L);
    received_to_sorted_.upload(handle_.received_to_sorted);
    sorted_to_received_.upload(handle_.sorted_to_received);
    return handle_;
}

const parallel::DispatchHandle& ExpertExchange::dispatch(
    const float* x_RD, const std::vector<int>& expert_offsets, int D, Buffer<float>& local_LD, bool as_bf16) {
    plan(expert_offsets);
    forward(x_RD, D, local_LD, as_bf16);
    return handle_;
}

void ExpertExchange::count_bytes(const std::vector<int64_t>& rows_to_peer, size_t row_bytes) {
    const int me = dispatcher_.communicator().rank();
    for (size_t p = 0; p < rows_to_peer.size(); ++p)
        if (static_cast<int>(p) != me) bytes_sent_ += rows_to_peer[p] * static_cast<int64_t>(row_bytes);
}

void ExpertExchange::forward(const float* rows_RD, int D, Buffer<float>& local_LD, bool as_bf16) {
    const size_t R = static_cast<size_t>(handle_.num_sent_rows()), L = static_cast<size_t>(handle_.num_local_rows());
    local_LD.ensure(backend_, L * D);
    if (as_bf16 && D % 2 == 0) {  // rounded, moved and regrouped in bf16, widened at the end
        send16_.ensure(backend_, R * D);
        local16_.ensure(backend_, L * D);
        if (R > 0) backend_->float_to_bf16(send16_.data(), rows_RD, R * D);
        forward(send16_.data(), D, local16_.data());
        if (L > 0) backend_->bf16_to_float(local_LD.data(), local16_.data(), L * D);
        return;
    }
    received_.ensure(backend_, L * D);
    if (staged_) {
        host_send_.resize(R * D);
        host_recv_.resize(L * D);
        if (R > 0) backend_->download(host_send_.data(), rows_RD, R * D * sizeof(float));
        dispatcher_.send_to_experts(handle_, host_send_.data(), D, host_recv_.data());
        if (L > 0) backend_->upload(received_.data(), host_recv_.data(), L * D * sizeof(float));
    } else {
        dispatcher_.send_to_experts(handle_, rows_RD, D, received_.data());
    }
    count_bytes(handle_.send_rows, D * sizeof(float));
    // local[sorted] = received[sorted_to_received[sorted]]
    if (L > 0)
        backend_->moe_gather_forward(local_LD.data(), received_.data(), sorted_to_received_.data(), static_cast<int>(L),
                                     1, D);
}

void ExpertExchange::forward(const uint16_t* rows16_RD, int D, uint16_t* local16_LD) {
    BMOE_REQUIRE(D % 2 == 0, "bf16 rows travel as pairs of values in 32-bit words: D must be even, got D = ", D);
    const size_t R = static_cast<size_t>(handle_.num_sent_rows()), L = static_cast<size_t>(handle_.num_local_rows());
    recv16_.ensure(backend_, L * D);
    // two bf16 values per int32 word: D / 2 words a row
    if (staged_) {
        host_send16_.resize(R * D);
        host_recv16_.resize(L * D);
        if (R > 0) backend_->download(host_send16_.data(), rows16_RD, R * D * sizeof(uint16_t));
        dispatcher_.send_to_experts(handle_, reinterpret_cast<const int32_t*>(host_send16_.data()), D / 2,
                                    reinterpret_cast<int32_t*>(host_recv16_.data()));
        if (L > 0) backend_->upload(recv16_.data(), host_recv16_.data(), L * D * sizeof(uint16_t));
    } else {
        dispatcher_.send_to_experts(handle_, reinterpret_cast<const int32_t*>(rows16_RD), D / 2,
                                    reinterpret_cast<int32_t*>(recv16_.data()));
    }
    count_bytes(handle_.send_rows, D * sizeof(uint16_t));
    // local[sorted] = received[sorted_to_received[sorted]]
    if (L > 0)
        backend_->gather_rows_bf16(local16_LD, recv16_.data(), sorted_to_received_.data(), static_cast<int>(L), D);
}

void ExpertExchange::combine(const float* local_LD, int D, float* y_RD) {
    const size_t R = static_cast<size_t>(handle_.num_sent_rows()), L = static_cast<size_t>(handle_.num_local_rows());
    received_.ensure(backend_, L * D);
    // received[r] = local[received_to_sorted[r]]
    if (L > 0)
        backend_->moe_gather_forward(received_.data(), local_LD, received_to_sorted_.data(), static_cast<int>(L), 1, D);
    if (staged_) {
        host_send_.resize(L * D);
        host_recv_.resize(R * D);
        if (L > 0) backend_->download(host_send_.data(), received_.data(), L * D * sizeof(float));
        dispatcher_.return_to_senders(handle_, host_send_.data(), D, host_recv_.data());
        if (R > 0) backend_->upload(y_RD, host_recv_.data(), R * D * sizeof(float));
    } else {
        dispatcher_.return_to_senders(handle_, received_.data(), D, y_RD);
    }
    count_bytes(handle_.recv_rows, D * sizeof(float));
}

}  // namespace bmoe::model
