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

const parallel::DispatchHandle& ExpertExchange::dispatch(const float* x_RD,
                                                         const std::vector<int>& expert_offsets,
                                                         int D,
                                                         Buffer<float>& local_LD) {
    handle_ = dispatcher_.plan(expert_offsets);
    const size_t L = static_cast<size_t>(handle_.num_local_rows());
    received_to_sorted_.ensure(backend_, L);
    sorted_to_received_.ensure(backend_, L);
    received_to_sorted_.upload(handle_.received_to_sorted);
    sorted_to_received_.upload(handle_.sorted_to_received);
    forward(x_RD, D, local_LD);
    return handle_;
}

void ExpertExchange::forward(const float* rows_RD, int D, Buffer<float>& local_LD) {
    const size_t R = static_cast<size_t>(handle_.num_sent_rows()), L = static_cast<size_t>(handle_.num_local_rows());
    received_.ensure(backend_, L * D);
    local_LD.ensure(backend_, L * D);
    if (staged_) {
        host_send_.resize(R * D);
        host_recv_.resize(L * D);
        if (R > 0) backend_->download(host_send_.data(), rows_RD, R * D * sizeof(float));
        dispatcher_.send_to_experts(handle_, host_send_.data(), D, host_recv_.data());
        if (L > 0) backend_->upload(received_.data(), host_recv_.data(), L * D * sizeof(float));
    } else {
        dispatcher_.send_to_experts(handle_, rows_RD, D, received_.data());
    }
    // local[sorted] = received[sorted_to_received[sorted]]
    if (L > 0)
        backend_->moe_gather_forward(local_LD.data(), received_.data(), sorted_to_received_.data(), static_cast<int>(L),
                                     1, D);
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
}

}  // namespace bmoe::model
