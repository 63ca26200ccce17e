#include "trainer/data_comm.h"

#include "parallel/check.h"
#ifdef BMOE_HAVE_NCCL
#include "model/cuda/cuda_backend.h"
#include "parallel/nccl_comm.h"
#endif

namespace bmoe::trainer {

std::string setup_data_comm(const ParallelConfig& config, model::Backend& backend, parallel::ProcessGrid& grid) {
    const bool want_nccl = config.comm == "nccl";
    if (config.comm == "mpi" || backend.name() != "cuda") return grid.world().name();
    if (!want_nccl && grid.world_size() == 1) return grid.world().name();  // nothing to move
#ifdef BMOE_HAVE_NCCL
    const std::string shared = parallel::shared_device_error(grid.world());
    if (!shared.empty()) {
        BMOE_REQUIRE(!want_nccl, shared);
        return grid.world().name() + " (ranks share a GPU: NCCL needs one GPU per rank)";
    }
    auto* cuda = dynamic_cast<model::CudaBackend*>(&backend);
    BMOE_ASSERT(cuda != nullptr, "backend 'cuda' is not a CudaBackend");
    grid.attach_device_world(parallel::make_nccl_world(grid.world(), cuda->stream()));
    return grid.data_world().name();
#else
    BMOE_REQUIRE(!want_nccl,
                 "--parallel.comm=nccl: this bmoe was built without NCCL (needs nccl.h and libnccl >= "
                 "2.18 at configure time): rebuild with NCCL or use --parallel.comm=mpi");
    return grid.world().name() + " (built without NCCL)";
#endif
}

}  // namespace bmoe::trainer
