// checkpoint_testing.h -- test-only fault injection for write_checkpoint (crash / failure mid-write).
//
// The hook runs on the writing rank (rank 0) at named stages: "dataset_written" (after each dataset,
// detail = "/group/name"), "flushed" (tmp file closed and fsynced) and "before_rename". A hook may
// throw (a failed write: the tmp file is removed, every rank throws) or _exit (a crash: the tmp file
// stays behind). Pass an empty function to remove it. Not for production code.
#pragma once

#include <functional>
#include <string>

namespace bmoe::checkpoints::testing {

using FaultHook = std::function<void(const std::string& stage, const std::string& detail)>;
void set_fault_hook(FaultHook hook);

}  // namespace bmoe::checkpoints::testing
