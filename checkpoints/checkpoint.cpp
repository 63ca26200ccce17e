// checkpoint.cpp -- write_checkpoint (gather to rank 0, atomic tmp + verify + rename) and the readers.
#include "checkpoints/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <sstream>
#include <system_error>

#include "checkpoints/checkpoint_internal.h"
#include "checkpoints/checkpoint_testing.h"
#include "checkpoints/h5_handles.h"
#include "parallel/check.h"

namespace bmoe::checkpoints {

namespace fs = std::filesystem;
using GroupMap = std::map<std::string, std::vector<TensorView>>;

// ---- shared helpers ----

namespace detail {

uint32_t crc32_bytes(const void* data, size_t num_bytes) {
    uLong crc = crc32(0L, Z_NULL, 0);
    const auto* p = static_cast<const Bytef*>(data);
    while (num_bytes > 0) {  // zlib takes uInt lengths
        uInt chunk = static_cast<uInt>(std::min<size_t>(num_bytes, 1u << 30));
        crc = crc32(crc, p, chunk);
        p += chunk;
        num_bytes -= chunk;
    }
    return static_cast<uint32_t>(crc);
}

H5File open_for_read(const std::string& path) {
    h5_silence_errors();
    std::error_code ec;
    BMOE_REQUIRE(fs::is_regular_file(path, ec), "checkpoint ", path, " does not exist (or is not a regular file)");
    htri_t is_h5 = H5Fis_hdf5(path.c_str());
    BMOE_REQUIRE(is_h5 > 0, "checkpoint ", path, " is not an HDF5 file (corrupt or truncated header)");
    hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, h5_file_access());
    BMOE_REQUIRE(id >= 0, "checkpoint ", path, " cannot be opened: HDF5 file is truncated or damaged");
    return H5File(id);
}

}  // namespace detail

namespace testing {
namespace {
FaultHook& hook_slot() {
    static FaultHook hook;
    return hook;
}
}  // namespace
void set_fault_hook(FaultHook hook) { hook_slot() = std::move(hook); }
}  // namespace testing

namespace {

void fault_point(const std::string& stage, const std::string& detail) {
    if (testing::hook_slot()) testing::hook_slot()(stage, detail);
}

uint64_t shape_numel(const std::vector<int64_t>& shape) {
    uint64_t n = 1;
    for (int64_t d : shape) n *= static_cast<uint64_t>(d);
    return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::ostringstream os;
    os << "[";
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << "]";
    return os.str();
}

std::string dataset_path(const std::string& group, const std::string& name) { return "/" + group + "/" + name; }

// This rank's problems with its own views (checked before any collective, so every rank can agree).
std::string local_view_error(const GroupMap& groups) {
    for (const auto& [group, views] : groups) {
        BMOE_REQUIRE(!group.empty() && group.front() != '/', "checkpoint group name '", group,
                     "' must be non-empty and relative (e.g. \"optimizer/m\")");
        for (const TensorView& v : views) {
            std::string ds = dataset_path(group, v.name);
            for (int64_t d : v.global_shape)
                if (d < 0) return concat("tensor ", ds, ": negative dimension in shape ", shape_str(v.global_shape));
            uint64_t total = shape_numel(v.global_shape);
            if (v.global_offset + v.numel > total)
                return concat("tensor ", ds, ": slice [", v.global_offset, ", ", v.global_offset + v.numel,
                              ") lies outside its global shape ", shape_str(v.global_shape), " (", total,
                              " elements): numel does not match the tensor");
            if (v.numel > 0 && v.contribute && v.data == nullptr)
                return concat("tensor ", ds, ": data is null but numel is ", v.numel);
        }
    }
    return "";
}

// Rank 0's error (empty = success) becomes every rank's error.
void throw_if_root_failed(const std::string& root_error, parallel::Communicator& world) {
    int64_t len = static_cast<int64_t>(root_error.size());
    world.broadcast(&len, sizeof(len), 0);
    if (len == 0) return;
    std::string msg = world.rank() == 0 ? root_error : std::string(static_cast<size_t>(len), '\0');
    world.broadcast(msg.data(), msg.size(), 0);
    throw Error(msg);
}

// Chunk shape of at most about 1 Mi elements (4 MiB), shrinking the leading dimensions first and
// splitting them evenly (HDF5 allocates whole chunks, so a ragged last chunk would waste space).
std::vector<hsize_t> chunk_dims(const std::vector<int64_t>& shape) {
    constexpr uint64_t kTarget = 1u << 20;
    std::vector<hsize_t> chunk(shape.begin(), shape.end());
    for (size_t i = 0; i < chunk.size(); ++i) {
        uint64_t total = 1;
        for (hsize_t c : chunk) total *= c;
        if (total <= kTarget) break;
        uint64_t others = total / chunk[i];
        uint64_t target = std::max<uint64_t>(1, kTarget / others);
        uint64_t pieces = (shape[i] + target - 1) / target;  // even split: no mostly-empty last chunk
        chunk[i] = (shape[i] + pieces - 1) / pieces;
    }
    return chunk;
}

void write_dataset(hid_t file, const std::string& ds_path, const std::vector<int64_t>& shape, const float* data) {
    uint64_t total = shape_numel(shape);
    H5Space space = shape.empty() ? H5Space(H5_CHECK(H5Screate(H5S_SCALAR))) : [&] {
        std::vector<hsize_t> dims(shape.begin(), shape.end());
        return H5Space(H5_CHECK(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)));
    }();
    H5Plist lcpl(H5_CHECK(H5Pcreate(H5P_LINK_CREATE)));
    H5_CHECK(H5Pset_create_intermediate_group(lcpl, 1));
    H5Plist dcpl(H5_CHECK(H5Pcreate(H5P_DATASET_CREATE)));
    if (!shape.empty() && total > 0) {  // scalars and empty tensors cannot be chunked
        std::vector<hsize_t> chunk = chunk_dims(shape);
        H5_CHECK(H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()));
    }
    H5Dataset ds(H5_CHECK(H5Dcreate2(file, ds_path.c_str(), H5T_IEEE_F32LE, space, lcpl, dcpl, H5P_DEFAULT)));
    if (total > 0) H5_CHECK(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
    h5_write_attr_u64(ds, detail::kChecksumAttr, detail::crc32_bytes(data, total * sizeof(float)));
}

// Reads a whole float dataset and checks its stored checksum; `what` names it in errors.
std::vector<float> read_verified(hid_t file, const std::string& path, const std::string& ds_path) {
    H5Dataset ds(H5_CHECK(H5Dopen2(file, ds_path.c_str(), H5P_DEFAULT)));
    H5Space space(H5_CHECK(H5Dget_space(ds)));
    hssize_t n = H5_CHECK(H5Sget_simple_extent_npoints(space));
    std::vector<float> buf(static_cast<size_t>(n));
    if (n > 0) {
        herr_t rc = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data());
        BMOE_REQUIRE(rc >= 0, "checkpoint ", path, " is corrupt: dataset ", ds_path,
                     " cannot be read (truncated or damaged file)");
    }
    BMOE_REQUIRE(h5_has_attr(ds, detail::kChecksumAttr), "checkpoint ", path, " is corrupt: dataset ", ds_path,
                 " has no ", detail::kChecksumAttr, " attribute");
    uint64_t stored = h5_read_attr_u64(ds, detail::kChecksumAttr);
    uint32_t actual = detail::crc32_bytes(buf.data(), buf.size() * sizeof(float));
    BMOE_REQUIRE(stored == actual, "checkpoint ", path, " is corrupt: checksum mismatch in dataset ", ds_path,
                 " (stored crc32 ", stored, ", computed ", actual, ")");
    return buf;
}

void fsync_path(const std::string& path, bool directory) {
    int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
    BMOE_REQUIRE(fd >= 0, "cannot open ", path, " to fsync it: ", std::strerror(errno));
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    BMOE_REQUIRE(rc == 0, "fsync of ", path, " failed: ", std::strerror(err));
}

void write_root_attrs(hid_t file, const CheckpointInfo& info) {
    h5_write_attr(file, "magic", std::string(detail::kMagic));
    h5_write_attr(file, "format_version", static_cast<int64_t>(kFormatVersion));
    h5_write_attr(file, "bmoe_version", std::string(BMOE_VERSION));
    h5_write_attr(file, "step", info.step);
    h5_write_attr(file, "config_toml", info.config_toml);
    h5_write_attr(file, "parent", info.parent);
    for (const auto& [key, value] : info.extra) h5_write_attr(file, "extra." + key, value);
}

// Reopens the finished tmp file and re-verifies every dataset against its checksum attribute.
void verify_written(const std::string& tmp, const GroupMap& groups) {
    H5File file = detail::open_for_read(tmp);
    for (const auto& [group, views] : groups)
        for (const TensorView& v : views) read_verified(file, tmp, dataset_path(group, v.name));
    file.close();
}

}  // namespace

// ---- write ----

void write_checkpoint(const std::string& path,
                      const CheckpointInfo& info,
                      const GroupMap& groups,
                      parallel::Communicator& world) {
    const int rank = world.rank();
    const int P = world.size();
    const std::string tmp = path + ".tmp";

    // 1. Every rank validates its own views; any failure aborts all ranks before any collective data.
    std::string local_error = local_view_error(groups);
    int64_t bad = local_error.empty() ? 0 : 1;
    world.all_reduce_sum(&bad, 1);
    if (bad > 0) {
        throw Error(local_error.empty()
                        ? concat("write_checkpoint ", path, ": aborted, ", bad, " rank(s) rejected their tensors")
                        : concat("write_checkpoint ", path, ": ", local_error));
    }

    // 2. Rank 0 creates the tmp file (any stale one from a crash is replaced).
    std::string root_error;
    H5File file;
    if (rank == 0) {
        try {
            h5_silence_errors();
            std::error_code ec;
            fs::path parent_dir = fs::path(path).parent_path();
            if (!parent_dir.empty()) fs::create_directories(parent_dir, ec);
            fs::remove(tmp, ec);
            hid_t id = H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, h5_file_access());
            BMOE_REQUIRE(id >= 0, "write_checkpoint: cannot create ", tmp, " (directory missing or not writable?)");
            file = H5File(id);
            write_root_attrs(file, info);
        } catch (const std::exception& e) {
            root_error = e.what();
            file.reset();
            std::error_code ec;
            fs::remove(tmp, ec);
        }
    }
    throw_if_root_failed(root_error, world);

    // 3. One tensor at a time: (offset, numel) of every rank, coverage check, gather to rank 0, write.
    //    Rank 0 keeps taking part in the collectives after an HDF5 failure, so no rank is left waiting.
    std::vector<int64_t> send_counts(P, 0), recv_counts(P, 0), slices(2 * P);
    std::vector<float> recv, full;
    for (const auto& [group, views] : groups) {
        for (const TensorView& v : views) {
            const std::string ds = dataset_path(group, v.name);
            const uint64_t total = shape_numel(v.global_shape);
            const int64_t mine[2] = {static_cast<int64_t>(v.global_offset),
                                     v.contribute ? static_cast<int64_t>(v.numel) : 0};
            world.all_gather(mine, sizeof(mine), slices.data());

            // Coverage: every rank computes the same verdict from the same gathered slices.
            std::vector<std::pair<int64_t, int64_t>> parts;
            for (int p = 0; p < P; ++p)
                if (slices[2 * p + 1] > 0) parts.emplace_back(slices[2 * p], slices[2 * p + 1]);
            std::sort(parts.begin(), parts.end());
            uint64_t covered = 0;
            bool tiles = true;
            for (const auto& [off, n] : parts) {
                if (static_cast<uint64_t>(off) != covered) tiles = false;
                covered = std::max<uint64_t>(covered, off + n);
            }
            if (!tiles || covered != total) {
                if (rank == 0) {
                    file.reset();
                    std::error_code ec;
                    fs::remove(tmp, ec);
                }
                throw Error(concat("write_checkpoint ", path, ": tensor ", ds,
                                   ": contributed slices do not tile it exactly (overlap or gap; ", total,
                                   " elements): set contribute=false on replicas and give each shard its own "
                                   "global_offset"));
            }

            std::fill(send_counts.begin(), send_counts.end(), 0);
            send_counts[0] = mine[1];
            for (int p = 0; p < P; ++p) recv_counts[p] = rank == 0 ? slices[2 * p + 1] : 0;
            if (rank == 0) recv.resize(total);
            world.all_to_all_v(v.data, send_counts.data(), rank == 0 ? recv.data() : nullptr, recv_counts.data());

            if (rank == 0 && root_error.empty()) {
                try {
                    // recv is packed in rank order; place each rank's block at its global offset.
                    const float* src = recv.data();
                    bool in_order = true;
                    int64_t pos = 0;
                    for (int p = 0; p < P; ++p) {
                        if (slices[2 * p + 1] == 0) continue;
                        if (slices[2 * p] != pos) in_order = false;
                        pos += slices[2 * p + 1];
                    }
                    if (!in_order) {
                        full.resize(total);
                        for (int p = 0; p < P; ++p) {
                            std::copy_n(src, slices[2 * p + 1], full.data() + slices[2 * p]);
                            src += slices[2 * p + 1];
                        }
                        src = full.data();
                    }
                    write_dataset(file, ds, v.global_shape, src);
                    fault_point("dataset_written", ds);
                } catch (const std::exception& e) {
                    root_error = concat("write_checkpoint ", path, ": ", e.what());
                }
            }
        }
    }

    // 4. Rank 0: flush, close, fsync, reopen + verify, rename, fsync the directory.
    if (rank == 0 && root_error.empty()) {
        try {
            H5_CHECK(H5Fflush(file, H5F_SCOPE_GLOBAL));
            file.close();
            fsync_path(tmp, false);
            fault_point("flushed", tmp);
            verify_written(tmp, groups);
            fault_point("before_rename", tmp);
            std::error_code ec;
            fs::rename(tmp, path, ec);
            BMOE_REQUIRE(!ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
            fs::path dir = fs::path(path).parent_path();
            fsync_path(dir.empty() ? "." : dir.string(), true);
        } catch (const std::exception& e) {
            root_error = concat("write_checkpoint ", path, ": ", e.what());
        }
    }
    if (rank == 0 && !root_error.empty()) {
        file.reset();
        std::error_code ec;
        fs::remove(tmp, ec);  // a failed write leaves nothing behind; `path` was never touched
    }
    throw_if_root_failed(root_error, world);
}

// ---- read ----

CheckpointInfo read_checkpoint_info(const std::string& path) {
    H5File file = detail::open_for_read(path);
    BMOE_REQUIRE(h5_has_attr(file, "format_version"), "checkpoint ", path,
                 " is not a bmoe checkpoint (no format_version attribute)");
    CheckpointInfo info;
    info.format_version = static_cast<int>(h5_read_attr_int(file, "format_version"));
    auto str = [&](const char* name) { return h5_has_attr(file, name) ? h5_read_attr_string(file, name) : ""; };
    info.bmoe_version = str("bmoe_version");
    info.config_toml = str("config_toml");
    info.parent = str("parent");
    info.step = h5_has_attr(file, "step") ? h5_read_attr_int(file, "step") : 0;

    H5O_info_t oinfo;
    H5_CHECK(H5Oget_info(file, &oinfo));
    for (hsize_t i = 0; i < oinfo.num_attrs; ++i) {
        ssize_t len = H5_CHECK(H5Aget_name_by_idx(file, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT));
        std::string name(static_cast<size_t>(len) + 1, '\0');
        H5_CHECK(H5Aget_name_by_idx(file, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT));
        name.resize(static_cast<size_t>(len));
        if (name.rfind("extra.", 0) == 0) info.extra[name.substr(6)] = h5_read_attr_string(file, name);
    }
    return info;
}

void read_checkpoint_tensors(const std::string& path, const GroupMap& groups) {
    H5File file = detail::open_for_read(path);
    BMOE_REQUIRE(h5_has_attr(file, "format_version"), "checkpoint ", path,
                 " is not a bmoe checkpoint (no format_version attribute)");
    int64_t version = h5_read_attr_int(file, "format_version");
    BMOE_REQUIRE(version == kFormatVersion, "checkpoint ", path, " has format_version ", version, " but this bmoe (",
                 BMOE_VERSION, ") reads format_version ", kFormatVersion,
                 ": HINT: load it with the bmoe version that wrote it (bmoe_version attribute: ",
                 h5_has_attr(file, "bmoe_version") ? h5_read_attr_string(file, "bmoe_version") : "unknown",
                 ") or convert it (checkpoints/FORMAT.md)");

    for (const auto& [group, views] : groups) {
        BMOE_REQUIRE(h5_path_exists(file, "/" + group), "checkpoint ", path, " has no group '", group, "'");
        for (const TensorView& v : views) {
            const std::string ds_path = dataset_path(group, v.name);
            BMOE_REQUIRE(h5_path_exists(file, ds_path), "checkpoint ", path, " has no dataset ", ds_path);
            std::vector<int64_t> file_shape;
            {
                H5Dataset ds(H5_CHECK(H5Dopen2(file, ds_path.c_str(), H5P_DEFAULT)));
                H5Space space(H5_CHECK(H5Dget_space(ds)));
                int ndims = H5_CHECK(H5Sget_simple_extent_ndims(space));
                std::vector<hsize_t> dims(static_cast<size_t>(ndims));
                H5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
                file_shape.assign(dims.begin(), dims.end());
            }
            BMOE_REQUIRE(file_shape == v.global_shape, "checkpoint ", path, ": dataset ", ds_path, " has shape ",
                         shape_str(file_shape), " but the model expects ", shape_str(v.global_shape));
            const uint64_t total = shape_numel(v.global_shape);
            BMOE_REQUIRE(v.global_offset + v.numel <= total, "read_checkpoint_tensors: slice [", v.global_offset, ", ",
                         v.global_offset + v.numel, ") of ", ds_path, " lies outside its ", total, " elements");
            BMOE_REQUIRE(v.numel == 0 || v.data != nullptr, "read_checkpoint_tensors: ", ds_path, " has null data");
            std::vector<float> full = read_verified(file, path, ds_path);
            std::copy_n(full.data() + v.global_offset, v.numel, v.data);
        }
    }
}

std::vector<bool> checkpoint_has_tensors(const std::string& path,
                                         const std::string& group,
                                         const std::vector<std::string>& names) {
    H5File file = detail::open_for_read(path);
    std::vector<bool> present;
    const bool has_group = h5_path_exists(file, "/" + group);
    for (const std::string& name : names)
        present.push_back(has_group && h5_path_exists(file, dataset_path(group, name)));
    return present;
}

}  // namespace bmoe::checkpoints
