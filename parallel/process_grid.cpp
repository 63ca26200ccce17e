// process_grid.cpp -- ProcessGrid layout (pure functions) and sub-communicator construction.
#include "parallel/process_grid.h"

#include <sstream>
#include <string>

#include "parallel/check.h"

namespace bmoe::parallel {

namespace {

// "1, 2, 4" for n = 4: the values a user may pick instead.
std::string divisors(int n) {
    std::ostringstream os;
    for (int d = 1; d <= n; ++d) {
        if (n % d == 0) os << (d > 1 ? ", " : "") << d;
    }
    return os.str();
}

}  // namespace

void validate_ep_size(int world_size, int ep_size) {
    BMOE_ASSERT(world_size >= 1, "world size ", world_size);
    BMOE_REQUIRE(ep_size >= 1, "--parallel.ep must be >= 1 (got ", ep_size, ")");
    BMOE_REQUIRE(world_size % ep_size == 0, "--parallel.ep=", ep_size, " does not divide the world size ", world_size,
                 ": launch a multiple of ", ep_size, " ranks, or set --parallel.ep to one of ", divisors(world_size));
}

GridCoords grid_coords(int world_size, int ep_size, int world_rank) {
    validate_ep_size(world_size, ep_size);
    BMOE_ASSERT(world_rank >= 0 && world_rank < world_size, "rank ", world_rank, " outside [0, ", world_size, ")");
    GridCoords c;
    c.world_rank = world_rank;
    c.world_size = world_size;
    c.ep_size = ep_size;
    c.dp_size = world_size / ep_size;
    c.ep_rank = world_rank % ep_size;
    c.dp_rank = world_rank / ep_size;
    return c;
}

std::vector<int> ep_group_ranks(const GridCoords& c) {
    std::vector<int> ranks(c.ep_size);
    for (int e = 0; e < c.ep_size; ++e) ranks[e] = c.dp_rank * c.ep_size + e;
    return ranks;
}

std::vector<int> dp_group_ranks(const GridCoords& c) {
    std::vector<int> ranks(c.dp_size);
    for (int d = 0; d < c.dp_size; ++d) ranks[d] = d * c.ep_size + c.ep_rank;
    return ranks;
}

ExpertRange expert_range(int num_experts, int ep_size, int ep_rank) {
    BMOE_ASSERT(ep_size >= 1 && ep_rank >= 0 && ep_rank < ep_size, "ep rank ", ep_rank, " of ", ep_size);
    BMOE_REQUIRE(num_experts >= 1, "--model.num_experts must be >= 1 (got ", num_experts, ")");
    BMOE_REQUIRE(
        num_experts % ep_size == 0, "--model.num_experts=", num_experts, " is not divisible by --parallel.ep=", ep_size,
        ": every expert-parallel rank holds the same number of experts; use a multiple of ", ep_size,
        " experts, or set --parallel.ep to one of ", divisors(num_experts), " that also divides the world size");
    const int num_local_experts = num_experts / ep_size;
    return ExpertRange{ep_rank * num_local_experts, num_local_experts};
}

ProcessGrid::ProcessGrid(Communicator& world, int ep_size)
    : world_(world), coords_(grid_coords(world.size(), ep_size, world.rank())) {
    // Keys are world ranks, so sub-communicator ranks follow the layout above.
    ep_ = world.split(/*color=*/coords_.dp_rank, /*key=*/coords_.world_rank);
    dp_ = world.split(/*color=*/coords_.ep_rank, /*key=*/coords_.world_rank);
    BMOE_ASSERT(ep_->size() == coords_.ep_size && ep_->rank() == coords_.ep_rank, "EP communicator is rank ",
                ep_->rank(), " of ", ep_->size(), ", expected ", coords_.ep_rank, " of ", coords_.ep_size);
    BMOE_ASSERT(dp_->size() == coords_.dp_size && dp_->rank() == coords_.dp_rank, "DP communicator is rank ",
                dp_->rank(), " of ", dp_->size(), ", expected ", coords_.dp_rank, " of ", coords_.dp_size);
}

void ProcessGrid::attach_device_world(std::unique_ptr<Communicator> device_world) {
    BMOE_ASSERT(
        device_world && device_world->size() == coords_.world_size && device_world->rank() == coords_.world_rank,
        "device world must span the host world with the same ranks");
    device_ep_ = device_world->split(/*color=*/coords_.dp_rank, /*key=*/coords_.world_rank);
    device_dp_ = device_world->split(/*color=*/coords_.ep_rank, /*key=*/coords_.world_rank);
    device_world_ = std::move(device_world);
}

ExpertRange ProcessGrid::expert_range(int num_experts) const {
    return parallel::expert_range(num_experts, coords_.ep_size, coords_.ep_rank);
}

}  // namespace bmoe::parallel
