// cli_test.cpp -- the `bmoe` binary as a user meets it: bad flags, bad config values, missing or
// corrupt files. Each must exit non-zero with ONE line on stderr that names the problem.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

namespace fs = std::filesystem;

struct RunResult {
    int rc = -1;
    std::string out, err;
};

std::string slurp(const fs::path& p) {
    std::ifstream f(p);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Runs `bmoe ARGS` in a scratch directory, capturing stdout and stderr separately.
RunResult run_bmoe(const std::string& args) {
    static int counter = 0;
    const fs::path dir = fs::temp_directory_path() / ("bmoe_cli_test_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const fs::path out = dir / ("out" + std::to_string(counter)), err = dir / ("err" + std::to_string(counter));
    ++counter;
    const std::string cmd = std::string("cd '") + dir.string() + "' && '" + BMOE_BINARY + "' " + args + " >'" +
                            out.string() + "' 2>'" + err.string() + "'";
    const int status = std::system(cmd.c_str());
    RunResult r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
}

int count_lines(const std::string& s) {
    int n = 0;
    for (char c : s) n += c == '\n';
    return n;
}

// Non-zero exit, exactly one stderr line, which contains `needle`.
void expect_one_line_error(const RunResult& r, const std::string& needle) {
    EXPECT_NE(r.rc, 0);
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
    EXPECT_NE(r.err.find("error"), std::string::npos) << r.err;
}

TEST(CliTest, HelpListsEveryOptionWithDefaults) {
    RunResult r = run_bmoe("train --help");
    EXPECT_EQ(r.rc, 0);
    for (const char* opt : {"--model.num_experts INT=8", "--model.top_k INT=2", "--optim.lr FLOAT=0.003",
                            "--data.dataset TEXT=synthetic", "--train.steps INT=300", "--config", "--print-config"})
        EXPECT_NE(r.out.find(opt), std::string::npos) << opt << "\n" << r.out;
    EXPECT_EQ(run_bmoe("data --help").rc, 0);
    EXPECT_EQ(run_bmoe("--help").rc, 0);
}

TEST(CliTest, UnknownFlagIsOneLineError) { expect_one_line_error(run_bmoe("train --model.bogus=3"), "--model.bogus"); }

TEST(CliTest, MissingSubcommandIsOneLineError) { expect_one_line_error(run_bmoe(""), "subcommand"); }

TEST(CliTest, BadConfigValuesAreOneLineErrors) {
    expect_one_line_error(run_bmoe("train --model.top_k=9 --model.num_experts=8"), "model.top_k");
    expect_one_line_error(run_bmoe("train --optim.lr=-1"), "optim.lr");
    expect_one_line_error(run_bmoe("train --model.norm=batchnorm"), "model.norm");
    expect_one_line_error(run_bmoe("train --model.num_experts=many"), "--model.num_experts");
    expect_one_line_error(run_bmoe("train --train.backend=tpu"), "train.backend");
    expect_one_line_error(run_bmoe("train --router.type=bayesian"), "router.type 'bayesian' is unknown");
    expect_one_line_error(run_bmoe("train --router.type=logit_mf --router.eval_samples=0"), "router.eval_samples");
    expect_one_line_error(run_bmoe("train --loss.router_reg_coef=-1"), "loss.router_reg_coef");
    expect_one_line_error(run_bmoe("train --router.temp_min=2 --router.temp_max=0.5"), "router.temp_max");
    expect_one_line_error(run_bmoe("train --router.prior_std=0"), "router.prior_std");
    expect_one_line_error(run_bmoe("train --data.loss_on=questions"), "data.loss_on");
    expect_one_line_error(run_bmoe("train --parallel.comm=gloo"), "parallel.comm must be 'auto', 'mpi' or 'nccl'");
    expect_one_line_error(run_bmoe("train --parallel.comm=nccl"), "needs --train.backend=cuda");
    expect_one_line_error(run_bmoe("train --parallel.overlap_grad_reduce=maybe"), "parallel.overlap_grad_reduce");
    expect_one_line_error(run_bmoe("train --parallel.combine_bf16=maybe"), "parallel.combine_bf16");
    expect_one_line_error(run_bmoe("train --train.precision=fp16"), "train.precision must be 'auto', 'fp32' or 'bf16'");
    expect_one_line_error(run_bmoe("train --train.recompute=all"), "train.recompute must be 'none' or a comma list");
    expect_one_line_error(run_bmoe("train --train.recompute=attention,ffn"), "'attention' and 'mlp'");
    expect_one_line_error(run_bmoe("train --train.attention=sdpa"), "train.attention must be 'gemm' or 'flash'");
    expect_one_line_error(run_bmoe("train --train.attention=flash"), "train.attention=flash runs on GPUs");
    expect_one_line_error(run_bmoe("train --train.attention=flash --train.backend=cuda --train.precision=fp32"),
                          "use --train.precision=bf16");
    expect_one_line_error(
        run_bmoe("train --train.attention=flash --train.backend=cuda --model.d_model=512 --model.num_heads=2 "
                 "--model.num_kv_heads=2"),
        "supports head_dim <= 128");
}

TEST(CliTest, CommBenchRunsAndRejectsBadSizes) {
    const RunResult ok = run_bmoe("comm-bench --max-bytes 4096 --iters 2 --warmup 0");
    EXPECT_EQ(ok.rc, 0) << ok.err;
    EXPECT_NE(ok.out.find("all_to_all"), std::string::npos) << ok.out;
    expect_one_line_error(run_bmoe("comm-bench --min-bytes 9 --max-bytes 4"), "--min-bytes <= --max-bytes");
    expect_one_line_error(run_bmoe("comm-bench --backend=tpu"), "unknown backend 'tpu'");
}

TEST(CliTest, FinetuneRouterErrors) {
    expect_one_line_error(run_bmoe("finetune-router --router.type=logit_mf"), "--init");
    expect_one_line_error(run_bmoe("finetune-router --init /nonexistent/parent.h5"), "/nonexistent/parent.h5");
    expect_one_line_error(run_bmoe("train --train.trainable='(unclosed' --train.steps=1 --data.train_tokens=20000"),
                          "not a valid regex");
}

TEST(CliTest, ConfigFileIsReadAndFlagsOverrideIt) {
    const fs::path cfg = fs::temp_directory_path() / ("bmoe_cli_cfg_" + std::to_string(::getpid()) + ".toml");
    std::ofstream(cfg) << "[model]\nnum_experts = 4\ntop_k = 1\nnorm = \"layernorm\"\n[optim]\nlr = 0.5\n";
    RunResult r = run_bmoe("train --config " + cfg.string() + " --optim.lr=0.25 --print-config");
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_NE(r.out.find("num_experts = 4"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("top_k = 1"), std::string::npos);
    EXPECT_NE(r.out.find("norm = \"layernorm\""), std::string::npos);
    EXPECT_NE(r.out.find("lr = 0.25"), std::string::npos) << "the flag must override the file";
    // The printed config is itself a valid config file that round-trips.
    const fs::path again = cfg.string() + ".2.toml";
    std::ofstream(again) << r.out;
    RunResult r2 = run_bmoe("train --config " + again.string() + " --print-config");
    ASSERT_EQ(r2.rc, 0) << r2.err;
    EXPECT_EQ(r2.out, r.out);
}

TEST(CliTest, MissingConfigFileIsOneLineError) {
    expect_one_line_error(run_bmoe("train --config /nonexistent/run.toml"), "/nonexistent/run.toml");
}

TEST(CliTest, MissingDatasetDirectoryIsOneLineError) {
    expect_one_line_error(run_bmoe("train --data.dataset=/nonexistent/data --train.steps=1"), "/nonexistent/data");
}

TEST(CliTest, EmptyTextFileIsOneLineError) {
    const fs::path empty = fs::temp_directory_path() / ("bmoe_cli_empty_" + std::to_string(::getpid()) + ".txt");
    std::ofstream(empty).close();
    expect_one_line_error(run_bmoe("data --source " + empty.string() + " --out " + empty.string() + ".d"),
                          empty.string());
}

TEST(CliTest, TruncatedTokenFileIsOneLineError) {
    const fs::path dir = fs::temp_directory_path() / ("bmoe_cli_data_" + std::to_string(::getpid()));
    RunResult made = run_bmoe(
        "data --source synthetic --train-tokens 20000 --val-tokens 5000 --ood-tokens 5000 --out " + dir.string());
    ASSERT_EQ(made.rc, 0) << made.err;
    const fs::path train = dir / "train.bin";
    fs::resize_file(train, fs::file_size(train) - 100);
    expect_one_line_error(run_bmoe("train --train.steps=1 --data.dataset=" + dir.string()), "truncated");
    fs::remove(train);
    expect_one_line_error(run_bmoe("train --train.steps=1 --data.dataset=" + dir.string()), "train.bin");
}

}  // namespace
