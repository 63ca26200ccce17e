// process_grid.h -- ProcessGrid: the world as dp x ep ranks, with one sub-communicator per axis.
//
// Layout: ep_size consecutive world ranks form one expert-parallel (EP) group, so with ep_size
// dividing the ranks per host the token all-to-all stays on the host:
//   world rank r:  ep_rank = r % ep_size,  dp_rank = r / ep_size
//   EP group of r: ranks with the same r / ep_size (different experts; exchange tokens)
//   DP group of r: ranks with the same r % ep_size (same experts; all-reduce expert gradients)
// e.g. world 4, ep 2: EP groups {0,1} {2,3}; DP groups {0,2} {1,3}. Dense parameters are
// replicated on every rank and all-reduce over world(). The pure functions below compute the
// layout without any communicator, so it is tested for many sizes without MPI.
#pragma once

#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace bmoe::parallel {

// One rank's coordinates in the grid.
struct GridCoords {
    int world_rank = 0;
    int world_size = 1;
    int ep_rank = 0;
    int ep_size = 1;
    int dp_rank = 0;
    int dp_size = 1;
};

// Global expert ids [first, first + count) held by one EP rank.
struct ExpertRange {
    int first = 0;
    int count = 0;
};

// Throws a one-line bmoe::Error naming --parallel.ep and the fix unless 1 <= ep_size and ep_size
// divides world_size.
void validate_ep_size(int world_size, int ep_size);

// Coordinates of world_rank in a world of world_size ranks split into EP groups of ep_size.
// Throws like validate_ep_size.
GridCoords grid_coords(int world_size, int ep_size, int world_rank);

// World ranks in the EP group (resp. DP group) of `c`, in ep_rank (resp. dp_rank) order.
std::vector<int> ep_group_ranks(const GridCoords& c);
std::vector<int> dp_group_ranks(const GridCoords& c);

// The experts of EP rank ep_rank: num_experts / ep_size consecutive ids. Throws a one-line
// bmoe::Error naming both numbers and the fix when ep_size does not divide num_experts.
ExpertRange expert_range(int num_experts, int ep_size, int ep_rank);

class ProcessGrid {
  public:
    // Collective over `world`, which must outlive the grid. Throws (on every rank alike) when
    // ep_size does not divide world.size().
    ProcessGrid(Communicator& world, int ep_size);

    // Host-memory communicators: statistics, checkpoints, control (and the data path without NCCL).
    Communicator& world() const { return world_; }
    Communicator& ep() const { return *ep_; }
    Communicator& dp() const { return *dp_; }

    // Collective: adds device-memory communicators over the same ranks (an NCCL world from
    // make_nccl_world; split here like the host ones), used for bulk tensor data only.
    void attach_device_world(std::unique_ptr<Communicator> device_world);
    // Communicators for bulk tensor data (token rows, gradients): the device ones once attached,
    // else the host ones. Callers stage through host memory when these do not read their buffers.
    Communicator& data_world() const { return device_world_ ? *device_world_ : world_; }
    Communicator& data_ep() const { return device_ep_ ? *device_ep_ : *ep_; }
    Communicator& data_dp() const { return device_dp_ ? *device_dp_ : *dp_; }

    const GridCoords& coords() const { return coords_; }
    int world_rank() const { return coords_.world_rank; }
    int world_size() const { return coords_.world_size; }
    int ep_rank() const { return coords_.ep_rank; }
    int ep_size() const { return coords_.ep_size; }
    int dp_rank() const { return coords_.dp_rank; }
    int dp_size() const { return coords_.dp_size; }

    // The experts this rank holds (see the free function).
    ExpertRange expert_range(int num_experts) const;

  private:
    Communicator& world_;
    GridCoords coords_;
    std::unique_ptr<Communicator> ep_;
    std::unique_ptr<Communicator> dp_;
    std::unique_ptr<Communicator> device_world_, device_ep_, device_dp_;  // attach_device_world
};

}  // namespace bmoe::parallel
