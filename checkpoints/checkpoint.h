// checkpoint.h -- bmoe's HDF5 training checkpoint: write (collective, atomic), read (any sharding),
// directory management (step files, the `latest` pointer, pruning) and a human-readable description.
//
// File layout, attributes, checksum and the atomicity protocol are specified in checkpoints/FORMAT.md.
// In short: datasets /<group>/<name> hold full (global-shape) float32 tensors, chunked; root
// attributes hold format_version, bmoe_version, step, config_toml, parent and extra.<key>; each
// dataset carries a crc32 attribute over its little-endian bytes. Rank 0 writes "<path>.tmp",
// flushes and fsyncs it, reopens it to verify every checksum, then renames it to `path`.
// Reading fills any slice of the flattened global tensor, so a different sharding (expert-parallel
// size) is just a different set of slices. Failures throw one-line bmoe::Error messages.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace bmoe::checkpoints {

inline constexpr int kFormatVersion = 1;

// One tensor (or this rank's slice of one) in host memory.
struct TensorView {
    std::string name;                   // e.g. "model.layers.0.block_sparse_moe.experts.w1"
    std::vector<int64_t> global_shape;  // full shape across all ranks
    uint64_t global_offset = 0;         // element offset of this rank's slice in the flattened global tensor
    uint64_t numel = 0;                 // elements in this rank's slice
    float* data = nullptr;              // write: read from here; read: filled here
    bool contribute = true;             // write: this rank's copy is the one stored (false for replicas)
};

struct CheckpointInfo {
    int64_t step = 0;
    std::string config_toml;                   // the run's resolved config
    std::string parent;                        // checkpoint this run started from ("" if none)
    std::map<std::string, std::string> extra;  // free-form metadata (e.g. "world_size")
    // filled on read:
    int format_version = 0;
    std::string bmoe_version;
};

// Collective over `world`. Every rank passes the same groups and tensor names (groups e.g. "model",
// "optimizer/m", "optimizer/v"); slices with contribute=true are gathered to rank 0 (one tensor at a
// time), which writes `path`. The contributed slices of each tensor must tile it exactly (no gaps, no
// overlaps). Written atomically: "<path>.tmp", H5Fflush + fsync, reopened and verified, renamed to
// `path`; a crash mid-write never damages an existing `path`. Every rank throws the same bmoe::Error.
void write_checkpoint(const std::string& path,
                      const CheckpointInfo& info,
                      const std::map<std::string, std::vector<TensorView>>& groups,
                      parallel::Communicator& world);

// Root attributes only (no tensors read); fills format_version and bmoe_version and does not reject
// other format versions (read_checkpoint_tensors does).
CheckpointInfo read_checkpoint_info(const std::string& path);

// Fills every view's data from its global slice (any rank, any sharding: resharding = reading another
// slice); verifies the checksum of every dataset it touches. Not collective. One-line bmoe::Error on:
// missing file, not HDF5 / truncated, wrong format_version (with a hint), missing group/dataset (named),
// shape mismatch (both shapes), checksum mismatch ("corrupt").
void read_checkpoint_tensors(const std::string& path, const std::map<std::string, std::vector<TensorView>>& groups);

// Which of `names` exist as datasets of `group` (for loading a parent checkpoint into a model that
// has more tensors, e.g. a variational router on top of a deterministic one).
std::vector<bool> checkpoint_has_tensors(const std::string& path,
                                         const std::string& group,
                                         const std::vector<std::string>& names);

// Directory management: files "<dir>/step_00001234.h5" and a text file "<dir>/latest" holding the file
// name, updated atomically (tmp + rename) only after a successful write; prune keeps the newest `keep`
// checkpoints (never the one `latest` names). latest_checkpoint returns "" when the dir or the pointer
// is absent. Call these on one rank (rank 0) after write_checkpoint returned.
std::string checkpoint_path(const std::string& dir, int64_t step);
void update_latest(const std::string& dir, const std::string& path);
std::string latest_checkpoint(const std::string& dir);
void prune_checkpoints(const std::string& dir, int keep);

// Human-readable tree: attributes (config abbreviated), step, groups, datasets with shape, dtype and
// checksum -- for `bmoe ckpt inspect`.
std::string describe_checkpoint(const std::string& path);

}  // namespace bmoe::checkpoints
