// data_comm.h -- picks the communicator for bulk tensor data (expert-parallel token rows,
// gradient all-reduce) from --parallel.comm and the backend, and attaches NCCL to the grid.
//   mpi : the host communicators (GPU buffers are staged through host memory)
//   nccl: an NCCL world over the same ranks (CUDA backend, one GPU per rank, built with NCCL)
//   auto: nccl when all of that holds, else mpi
// Statistics, checkpoints and control messages always use the host (MPI) communicators.
#pragma once

#include <string>

#include "model/backend.h"
#include "parallel/process_grid.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

// Collective over grid.world(). Returns what was chosen and why, for the log ("nccl", "mpi", or
// "mpi (reason)"). Throws a one-line bmoe::Error (on every rank alike) when nccl is requested but
// impossible.
std::string setup_data_comm(const ParallelConfig& config, model::Backend& backend, parallel::ProcessGrid& grid);

}  // namespace bmoe::trainer
