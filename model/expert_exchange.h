// expert_exchange.h -- ExpertExchange: the expert-parallel row exchange on backend memory.
//
// Wraps parallel::ExpertDispatcher (which moves rows in the communicator's memory) for one
// backend: rows go straight from backend buffers into the all-to-all when the communicator reads
// that memory (CPU backend + MPI, CUDA backend + NCCL), and are staged through host memory
// otherwise (CUDA backend + MPI: several ranks sharing one GPU, or no NCCL). The regrouping from
// received order (source rank, local expert) to expert-sorted order is a row gather on the
// backend (moe_gather_forward with K = 1), so rows never visit the host on the direct path.
//
//   plan(offsets)                (the row counts of every rank; L = rows arriving here)
//   forward(x_RD) -> local_LD    (sorted by local expert: the grouped GEMM input; fp32 or bf16)
//   forward(dy_RD) -> local_LD   (same movement for another tensor, e.g. dy in backward)
//   dispatch(x_RD) = plan, then forward
//   combine(local_LD) -> y_RD    (back to the slots the rows came from)
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "parallel/expert_dispatcher.h"

namespace bmoe::model {

class ExpertExchange {
  public:
    // Throws a one-line bmoe::Error when the communicator's memory is device memory but the
    // backend's is host memory (NCCL needs the CUDA backend), or E is not divisible by the EP size.
    // force_staging: stage through host memory even when the communicator reads the backend's
    // memory (tests run the staged path of GPU + MPI runs on the CPU backend this way).
    // counts: the host communicator of the same EP group for the row counts (nullptr = ep).
    ExpertExchange(parallel::Communicator& ep,
                   int num_experts,
                   Backend* backend,
                   bool force_staging = false,
                   parallel::Communicator* counts = nullptr);

    // Plans the exchange for rows grouped by global expert (expert_offsets [E+1]): the handle says
    // how many rows arrive here (num_local_rows() = L) before any row moves.
    const parallel::DispatchHandle& plan(const std::vector<int>& expert_offsets);
    // plan(expert_offsets), then forward(x_RD, ...).
    const parallel::DispatchHandle& dispatch(const float* x_RD,
                                             const std::vector<int>& expert_offsets,
                                             int D,
                                             Buffer<float>& local_LD,
                                             bool as_bf16 = false);
    // Moves rows_RD (grouped by global expert, as planned) to local_LD (grows to L x D), sorted by
    // local expert. as_bf16: the rows only feed bf16 GEMMs (model/precision.h), which round them
    // to bf16 anyway: they travel as bf16 (half the bytes) and arrive as exactly those rounded
    // values (even D only; odd D travels as fp32).
    void forward(const float* rows_RD, int D, Buffer<float>& local_LD, bool as_bf16 = false);
    // The same for rows already in bf16 (even D), into a caller's [L, D] buffer: no fp32 copy on
    // either side (the experts' kept bf16 input copy, or their bf16 d output rows).
    void forward(const uint16_t* rows16_RD, int D, uint16_t* local16_LD);
    // local_LD (sorted by local expert) back to the slots the rows came from: y_RD [R, D].
    // as_bf16 (even D; bf16 precision): the rows travel rounded to bf16 (half the bytes) and arrive
    // as those rounded values -- a change of the numbers, as a bf16 GEMM output's rounding is.
    void combine(const float* local_LD, int D, float* y_RD, bool as_bf16 = false);
    // Bytes this rank sent to other ranks since the last call (payloads as they travelled).
    int64_t take_bytes_sent() { return std::exchange(bytes_sent_, 0); }

    const parallel::DispatchHandle& handle() const { return handle_; }
    bool staged() const { return staged_; }  // rows pass through host memory
    double take_seconds() { return dispatcher_.take_seconds(); }

  private:
    parallel::ExpertDispatcher dispatcher_;
    Backend* backend_;
    bool staged_;
    parallel::DispatchHandle handle_;
    Buffer<int32_t> received_to_sorted_, sorted_to_received_;  // the handle's permutations
    Buffer<float> received_;                                   // [L, D] rows in received order
    Buffer<uint16_t> rows16_R_, rows16_L_;      // bf16 rows in the senders' order [R, D], in received order [L, D]
    Buffer<uint16_t> local16_;                  // [L, D] bf16 rows sorted by local expert (fp32 rows as_bf16)
    std::vector<float> host_send_, host_recv_;  // staging (staged_ only)
    std::vector<int32_t> host_send_words_, host_recv_words_;
    int64_t bytes_sent_ = 0;
    // Rows sent to OTHER ranks (the bytes that cross a link) for a payload of row_bytes per row.
    void count_bytes(const std::vector<int64_t>& rows_to_peer, size_t row_bytes);
    enum class Direction { kToExperts, kToSenders };
    // The all-to-all of rows of W words in the planned direction, staged through host memory where
    // the communicator cannot read the backend's; counts the bytes.
    template <typename Word>
    void move(Direction direction, const Word* send, Word* recv, int W);
    template <typename Word>
    std::vector<Word>& host_staging(int i);  // 0: send, 1: receive
};

}  // namespace bmoe::model
