// checkpoint_test.cpp -- HDF5 checkpoint: round trip, resharded reads, atomic writes (failure and crash
// mid-write), corrupt / truncated / foreign / wrong-version files, latest pointer and pruning.
// Single process (LocalComm); checkpoint_mpi_test.cpp covers multi-rank gathering.
#include "checkpoints/checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>

#include "checkpoints/checkpoint_testing.h"
#include "checkpoints/h5_handles.h"
#include "parallel/check.h"
#include "parallel/local_comm.h"

namespace bmoe::checkpoints {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using GroupMap = std::map<std::string, std::vector<TensorView>>;

// Owns tensors' storage; values encode (tensor seed, flat index) so every element is distinct.
struct Tensors {
    std::map<std::string, std::vector<float>> store;

    TensorView add(const std::string& key, const std::string& name, std::vector<int64_t> shape, float seed) {
        uint64_t n = 1;
        for (int64_t d : shape) n *= d;
        auto& buf = store[key + "/" + name];
        buf.resize(n);
        for (uint64_t i = 0; i < n; ++i) buf[i] = seed + 0.5f * static_cast<float>(i);
        return TensorView{name, shape, 0, n, buf.data(), true};
    }
};

class CheckpointTest : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ = fs::temp_directory_path() / ("bmoe_ckpt_test_" + std::to_string(::getpid()) + "_" +
                                            ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::remove_all(dir_);
        fs::create_directories(dir_);
    }
    void TearDown() override {
        testing::set_fault_hook({});
        fs::remove_all(dir_);
    }

    // A small model + optimizer state, seeded by `seed`.
    GroupMap make_groups(Tensors& t, float seed) {
        GroupMap g;
        g["model"] = {t.add("model", "model.embed", {10, 4}, seed),
                      t.add("model", "model.experts.w1", {4, 3, 5}, seed + 1),
                      t.add("model", "model.scale", {}, seed + 2)};
        g["optimizer/m"] = {t.add("m", "model.embed", {10, 4}, seed + 3)};
        g["optimizer/v"] = {t.add("v", "model.embed", {10, 4}, seed + 4)};
        return g;
    }

    static GroupMap zeroed_like(const GroupMap& g, Tensors& t) {
        GroupMap out;
        for (const auto& [group, views] : g)
            for (const TensorView& v : views) {
                TensorView z = t.add(group, v.name, v.global_shape, 0.0f);
                std::fill(t.store[group + "/" + v.name].begin(), t.store[group + "/" + v.name].end(), -1.0f);
                out[group].push_back(z);
            }
        return out;
    }

    static void expect_same(const GroupMap& a, const GroupMap& b) {
        for (const auto& [group, views] : a)
            for (size_t i = 0; i < views.size(); ++i)
                for (uint64_t k = 0; k < views[i].numel; ++k)
                    ASSERT_EQ(views[i].data[k], b.at(group)[i].data[k])
                        << group << "/" << views[i].name << "[" << k << "]";
    }

    CheckpointInfo make_info(int64_t step) {
        CheckpointInfo info;
        info.step = step;
        info.config_toml = "[model]\nhidden = 4\nexperts = 4\n";
        info.parent = "runs/a/step_00000001.h5";
        info.extra = {{"world_size", "1"}, {"note", "unit test"}};
        return info;
    }

    std::string path(const std::string& name) const { return (dir_ / name).string(); }

    fs::path dir_;
    parallel::LocalComm comm_;
};

std::string error_of(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}

TEST(H5Handles, CheckNamesTheCall) {
    h5_silence_errors();
    std::string err = error_of([] { H5File f(H5_CHECK(H5Fopen("/nonexistent/x.h5", H5F_ACC_RDONLY, H5P_DEFAULT))); });
    EXPECT_THAT(err, HasSubstr("HDF5 error"));
    EXPECT_THAT(err, HasSubstr("H5Fopen(\"/nonexistent/x.h5\""));
}

TEST_F(CheckpointTest, RoundTripGroupsAndInfo) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = checkpoint_path(dir_.string(), 42);
    write_checkpoint(p, make_info(42), groups, comm_);
    EXPECT_TRUE(fs::exists(p));
    EXPECT_FALSE(fs::exists(p + ".tmp"));

    CheckpointInfo info = read_checkpoint_info(p);
    EXPECT_EQ(info.step, 42);
    EXPECT_EQ(info.format_version, kFormatVersion);
    EXPECT_EQ(info.bmoe_version, BMOE_VERSION);
    EXPECT_EQ(info.config_toml, make_info(42).config_toml);
    EXPECT_EQ(info.parent, "runs/a/step_00000001.h5");
    EXPECT_EQ(info.extra, make_info(42).extra);

    Tensors dst;
    GroupMap back = zeroed_like(groups, dst);
    read_checkpoint_tensors(p, back);
    expect_same(groups, back);
}

TEST_F(CheckpointTest, EmptyStringsAndNoExtra) {
    Tensors src;
    GroupMap groups{{"model", {src.add("model", "w", {3}, 0.0f)}}};
    CheckpointInfo info;
    write_checkpoint(path("a.h5"), info, groups, comm_);
    CheckpointInfo back = read_checkpoint_info(path("a.h5"));
    EXPECT_EQ(back.config_toml, "");
    EXPECT_EQ(back.parent, "");
    EXPECT_TRUE(back.extra.empty());
}

TEST_F(CheckpointTest, ReadSlicesAtAnyOffset) {
    Tensors src;
    GroupMap groups{{"model", {src.add("model", "experts.w1", {8, 3, 5}, 2.0f)}}};
    write_checkpoint(path("full.h5"), make_info(1), groups, comm_);
    const std::vector<float>& full = src.store["model/experts.w1"];
    // Expert-parallel shards of 1, 2 and 4 experts, plus an odd unaligned slice.
    for (auto [offset, numel] :
         std::vector<std::pair<uint64_t, uint64_t>>{{0, 15}, {30, 30}, {60, 60}, {7, 11}, {119, 1}}) {
        std::vector<float> slice(numel, -1.0f);
        read_checkpoint_tensors(path("full.h5"),
                                {{"model", {TensorView{"experts.w1", {8, 3, 5}, offset, numel, slice.data()}}}});
        for (uint64_t k = 0; k < numel; ++k) ASSERT_EQ(slice[k], full[offset + k]) << offset << "+" << k;
    }
    std::vector<float> one(1);
    EXPECT_THAT(error_of([&] {
                    read_checkpoint_tensors(path("full.h5"),
                                            {{"model", {TensorView{"experts.w1", {8, 3, 5}, 120, 1, one.data()}}}});
                }),
                HasSubstr("outside"));
}

TEST_F(CheckpointTest, ChunkingWastesNoSpace) {
    // 1.25 Mi elements: one 1 Mi-element chunk plus a mostly empty one would make the file 8 MiB.
    Tensors src;
    GroupMap groups{{"model", {src.add("model", "big", {1310720}, 0.0f), src.add("model", "wide", {3, 700001}, 1.0f)}}};
    write_checkpoint(path("big.h5"), make_info(1), groups, comm_);
    const double data_bytes = (1310720.0 + 3 * 700001.0) * sizeof(float);
    EXPECT_LT(static_cast<double>(fs::file_size(path("big.h5"))), 1.05 * data_bytes);
    Tensors dst;
    GroupMap back = zeroed_like(groups, dst);
    read_checkpoint_tensors(path("big.h5"), back);
    expect_same(groups, back);
}

TEST_F(CheckpointTest, ReplicaThatDoesNotContributeLeavesAGap) {
    Tensors src;
    GroupMap groups{{"model", {src.add("model", "w", {4}, 0.0f)}}};
    groups["model"][0].contribute = false;
    EXPECT_THAT(error_of([&] { write_checkpoint(path("gap.h5"), make_info(1), groups, comm_); }),
                HasSubstr("do not tile it exactly"));
    EXPECT_FALSE(fs::exists(path("gap.h5")));
    EXPECT_FALSE(fs::exists(path("gap.h5.tmp")));
}

TEST_F(CheckpointTest, FailedWriteKeepsPreviousCheckpointAndLatest) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = checkpoint_path(dir_.string(), 5);
    write_checkpoint(p, make_info(5), groups, comm_);
    update_latest(dir_.string(), p);

    // (a) rejected before writing: numel does not match the shape.
    Tensors src2;
    GroupMap bad = make_groups(src2, 100.0f);
    bad["model"][1].numel = 1000;
    EXPECT_THAT(error_of([&] { write_checkpoint(p, make_info(6), bad, comm_); }), HasSubstr("model.experts.w1"));

    // (b) failure part-way: the hook throws after the first dataset is on disk.
    Tensors src3;
    GroupMap other = make_groups(src3, 200.0f);
    int written = 0;
    testing::set_fault_hook([&](const std::string& stage, const std::string&) {
        if (stage == "dataset_written" && ++written == 2) throw Error("injected I/O failure");
    });
    EXPECT_THAT(error_of([&] { write_checkpoint(p, make_info(6), other, comm_); }), HasSubstr("injected I/O failure"));
    testing::set_fault_hook({});
    EXPECT_FALSE(fs::exists(p + ".tmp"));

    EXPECT_EQ(latest_checkpoint(dir_.string()), p);
    EXPECT_EQ(read_checkpoint_info(p).step, 5);
    Tensors dst;
    GroupMap back = zeroed_like(groups, dst);
    read_checkpoint_tensors(p, back);
    expect_same(groups, back);
}

TEST_F(CheckpointTest, CrashMidWriteLeavesPreviousCheckpointLoadable) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = checkpoint_path(dir_.string(), 7);
    write_checkpoint(p, make_info(7), groups, comm_);
    update_latest(dir_.string(), p);

    for (const char* crash_stage : {"dataset_written", "flushed", "before_rename"}) {
        Tensors src2;
        GroupMap next = make_groups(src2, 50.0f);
        pid_t pid = ::fork();
        ASSERT_GE(pid, 0);
        if (pid == 0) {  // child: dies (no cleanup, no destructors) in the middle of the write
            std::string stage_to_crash = crash_stage;
            testing::set_fault_hook([&](const std::string& stage, const std::string&) {
                if (stage == stage_to_crash) ::_exit(3);
            });
            try {
                write_checkpoint(p, make_info(8), next, comm_);
            } catch (...) {
                ::_exit(4);
            }
            ::_exit(0);
        }
        int status = 0;
        ASSERT_EQ(::waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status));
        EXPECT_EQ(WEXITSTATUS(status), 3) << crash_stage;
        EXPECT_TRUE(fs::exists(p + ".tmp")) << crash_stage;  // the crash leaves its debris ...
        EXPECT_EQ(latest_checkpoint(dir_.string()), p);      // ... but not in `path` or `latest`
        EXPECT_EQ(read_checkpoint_info(p).step, 7) << crash_stage;
        Tensors dst;
        GroupMap back = zeroed_like(groups, dst);
        read_checkpoint_tensors(p, back);
        expect_same(groups, back);
    }
    // The next write replaces the stale tmp file.
    write_checkpoint(p, make_info(9), groups, comm_);
    EXPECT_FALSE(fs::exists(p + ".tmp"));
    EXPECT_EQ(read_checkpoint_info(p).step, 9);
}

TEST_F(CheckpointTest, StaleTruncatedTmpIsReplaced) {
    const std::string p = path("x.h5");
    std::ofstream(p + ".tmp") << "\x89HDF\r\n\x1a\n half a file";
    Tensors src;
    GroupMap groups = make_groups(src, 3.0f);
    write_checkpoint(p, make_info(3), groups, comm_);
    Tensors dst;
    GroupMap back = zeroed_like(groups, dst);
    read_checkpoint_tensors(p, back);
    expect_same(groups, back);
}

std::vector<char> slurp(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}
void spit(const std::string& p, const std::vector<char>& bytes) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST_F(CheckpointTest, FlippedByteInDatasetIsCorrupt) {
    Tensors src;
    GroupMap groups{{"model", {src.add("model", "w", {64, 16}, 1234.0f)}}};
    const std::string p = path("c.h5");
    write_checkpoint(p, make_info(1), groups, comm_);
    std::vector<char> bytes = slurp(p);
    const std::vector<float>& w = src.store["model/w"];
    const char* needle = reinterpret_cast<const char*>(w.data() + 100);
    auto it = std::search(bytes.begin(), bytes.end(), needle, needle + 16);
    ASSERT_NE(it, bytes.end()) << "tensor bytes not found in the file";
    *(it + 2) ^= 0x40;
    spit(p, bytes);
    std::vector<float> out(64 * 16);
    std::string err = error_of([&] {
        read_checkpoint_tensors(p, {{"model", {TensorView{"w", {64, 16}, 0, 1024, out.data()}}}});
    });
    EXPECT_THAT(err, HasSubstr("corrupt"));
    EXPECT_THAT(err, HasSubstr("/model/w"));
}

TEST_F(CheckpointTest, TruncatedMissingAndForeignFiles) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = path("t.h5");
    write_checkpoint(p, make_info(1), groups, comm_);
    std::vector<char> bytes = slurp(p);
    Tensors dst;
    GroupMap back = zeroed_like(groups, dst);

    bytes.resize(bytes.size() / 2);
    spit(path("half.h5"), bytes);
    std::string err = error_of([&] { read_checkpoint_tensors(path("half.h5"), back); });
    EXPECT_THAT(err, HasSubstr("half.h5"));
    EXPECT_THAT(err, HasSubstr("truncated"));

    bytes.resize(100);
    spit(path("tiny.h5"), bytes);
    EXPECT_THAT(error_of([&] { read_checkpoint_info(path("tiny.h5")); }), HasSubstr("tiny.h5"));

    EXPECT_THAT(error_of([&] { read_checkpoint_info(path("nope.h5")); }), HasSubstr("does not exist"));
    std::ofstream(path("text.h5")) << "model = 3\n";
    EXPECT_THAT(error_of([&] { read_checkpoint_tensors(path("text.h5"), back); }), HasSubstr("not an HDF5 file"));
}

TEST_F(CheckpointTest, WrongFormatVersionHasHint) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = path("v.h5");
    write_checkpoint(p, make_info(1), groups, comm_);
    {
        H5File f(H5_CHECK(H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)));
        h5_write_attr(f, "format_version", int64_t{99});
    }
    EXPECT_EQ(read_checkpoint_info(p).format_version, 99);
    Tensors dst;
    GroupMap back = zeroed_like(groups, dst);
    std::string err = error_of([&] { read_checkpoint_tensors(p, back); });
    EXPECT_THAT(err, HasSubstr("format_version 99"));
    EXPECT_THAT(err, HasSubstr("HINT"));
}

TEST_F(CheckpointTest, MissingNamesAndShapeMismatch) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = path("m.h5");
    write_checkpoint(p, make_info(1), groups, comm_);
    std::vector<float> buf(1000);
    EXPECT_THAT(error_of([&] {
                    read_checkpoint_tensors(p, {{"rng", {TensorView{"x", {1}, 0, 1, buf.data()}}}});
                }),
                HasSubstr("no group 'rng'"));
    EXPECT_THAT(error_of([&] {
                    read_checkpoint_tensors(p, {{"model", {TensorView{"model.missing", {1}, 0, 1, buf.data()}}}});
                }),
                HasSubstr("no dataset /model/model.missing"));
    std::string err = error_of([&] {
        read_checkpoint_tensors(p, {{"model", {TensorView{"model.embed", {10, 5}, 0, 50, buf.data()}}}});
    });
    EXPECT_THAT(err, HasSubstr("[10, 4]"));
    EXPECT_THAT(err, HasSubstr("[10, 5]"));
}

TEST_F(CheckpointTest, LatestPointerAndPrune) {
    const std::string d = dir_.string();
    EXPECT_EQ(latest_checkpoint((dir_ / "absent").string()), "");
    EXPECT_EQ(latest_checkpoint(d), "");
    EXPECT_EQ(checkpoint_path("runs/x", 1234), "runs/x/step_00001234.h5");

    Tensors src;
    GroupMap groups{{"model", {src.add("model", "w", {2}, 0.0f)}}};
    for (int64_t step = 1; step <= 5; ++step) {
        write_checkpoint(checkpoint_path(d, step), make_info(step), groups, comm_);
        update_latest(d, checkpoint_path(d, step));
        EXPECT_EQ(latest_checkpoint(d), checkpoint_path(d, step));
    }
    std::ofstream(dir_ / "notes.txt") << "keep me";
    update_latest(d, checkpoint_path(d, 2));  // e.g. the run rolled back to step 2
    prune_checkpoints(d, 2);
    EXPECT_FALSE(fs::exists(checkpoint_path(d, 1)));
    EXPECT_TRUE(fs::exists(checkpoint_path(d, 2)));  // named by latest
    EXPECT_FALSE(fs::exists(checkpoint_path(d, 3)));
    EXPECT_TRUE(fs::exists(checkpoint_path(d, 4)));
    EXPECT_TRUE(fs::exists(checkpoint_path(d, 5)));
    EXPECT_TRUE(fs::exists(dir_ / "notes.txt"));
    EXPECT_EQ(latest_checkpoint(d), checkpoint_path(d, 2));
    EXPECT_FALSE(fs::exists(dir_ / "latest.tmp"));
    EXPECT_THROW(update_latest(d, checkpoint_path(d, 99)), Error);
    EXPECT_EQ(latest_checkpoint(d), checkpoint_path(d, 2));
}

TEST_F(CheckpointTest, DescribeListsTree) {
    Tensors src;
    GroupMap groups = make_groups(src, 1.0f);
    const std::string p = path("d.h5");
    write_checkpoint(p, make_info(12), groups, comm_);
    std::string text = describe_checkpoint(p);
    EXPECT_THAT(text, HasSubstr("step 12"));
    EXPECT_THAT(text, HasSubstr("/model/model.experts.w1  float32 [4, 3, 5]  crc32="));
    EXPECT_THAT(text, HasSubstr("/optimizer/m/model.embed  float32 [10, 4]"));
    EXPECT_THAT(text, HasSubstr("extra.world_size: 1"));
    EXPECT_THAT(text, HasSubstr("config_toml: 31 bytes, 3 lines"));
}

// Writes a checkpoint plus expected.json for tests/ckpt_python_test.sh (skipped unless
// BMOE_CKPT_EXPORT_DIR is set).
TEST(CheckpointExport, WriteForPython) {
    const char* out_dir = std::getenv("BMOE_CKPT_EXPORT_DIR");
    if (!out_dir) GTEST_SKIP() << "BMOE_CKPT_EXPORT_DIR not set (run by ckpt_python_test.sh)";
    Tensors src;
    GroupMap g;
    g["model"] = {src.add("model", "model.embed", {10, 4}, 1.0f),
                  src.add("model", "model.experts.w1", {4, 3, 5}, -2.0f), src.add("model", "model.scale", {}, 0.25f)};
    g["optimizer/m"] = {src.add("m", "model.embed", {10, 4}, 3.0f)};
    CheckpointInfo info;
    info.step = 17;
    info.config_toml = "[model]\nhidden = 4\n";
    info.extra = {{"world_size", "1"}};
    parallel::LocalComm comm;
    write_checkpoint(std::string(out_dir) + "/export.h5", info, g, comm);
    std::ofstream js(std::string(out_dir) + "/expected.json");
    js << "{\"step\": 17, \"tensors\": {";
    bool first = true;
    for (const auto& [group, views] : g)
        for (const TensorView& v : views) {
            double sum = 0;
            for (uint64_t i = 0; i < v.numel; ++i) sum += v.data[i];
            js << (first ? "" : ", ") << "\"" << group << "/" << v.name << "\": {\"sum\": " << sum
               << ", \"first\": " << v.data[0] << ", \"last\": " << v.data[v.numel - 1] << ", \"shape\": [";
            for (size_t i = 0; i < v.global_shape.size(); ++i) js << (i ? ", " : "") << v.global_shape[i];
            js << "]}";
            first = false;
        }
    js << "}}\n";
}

// Write time of a ~50 MB checkpoint (FORMAT.md): run with --gtest_also_run_disabled_tests.
TEST_F(CheckpointTest, DISABLED_WriteTime50MB) {
    const uint64_t n = 50ull * 1000 * 1000 / 4;
    std::vector<float> buf(n);
    std::iota(buf.begin(), buf.end(), 0.0f);
    GroupMap groups;
    const int tensors = 10;
    for (int i = 0; i < tensors; ++i)
        groups["model"].push_back(TensorView{
            "t" + std::to_string(i), {int64_t(n / tensors)}, 0, n / tensors, buf.data() + i * (n / tensors)});
    for (int rep = 0; rep < 3; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        write_checkpoint(path("big.h5"), make_info(1), groups, comm_);
        auto t1 = std::chrono::steady_clock::now();
        read_checkpoint_tensors(path("big.h5"), groups);
        auto t2 = std::chrono::steady_clock::now();
        std::printf("50 MB checkpoint: write %.3f s, read %.3f s (file %.1f MB)\n",
                    std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t1).count(),
                    fs::file_size(path("big.h5")) / 1e6);
    }
}

}  // namespace
}  // namespace bmoe::checkpoints
