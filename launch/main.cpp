// main.cpp -- the `bmoe` command: subcommands train, finetune-router, eval, comm-bench, data, ckpt inspect,
// ckpt import.
//
// Every failure ends as ONE line on stderr, "bmoe <cmd>: error: <what and how to fix>", and a
// non-zero exit status: bad flags and config values (CLI11 / RunConfig::validate), bad data
// files (data/), NaN/Inf during training (trainer/). Under mpirun/srun the line carries the
// rank and host, and the failing rank aborts the whole job (MPI_Abort) instead of hanging it.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "data/data_command.h"
#include "eval/evaluator.h"
#include "model/backend.h"
#include "model/cpu_threads.h"
#include "parallel/check.h"
#include "parallel/local_comm.h"
#include "parallel/mpi_comm.h"
#include "parallel/mpi_env.h"
#include "trainer/comm_bench.h"
#include "trainer/hf_import.h"
#include "trainer/run_config.h"
#include "trainer/trainer.h"

namespace {

int fail(const std::string& cmd, const std::string& message) {
    std::cerr << "bmoe" << (cmd.empty() ? "" : " " + cmd) << ": error: " << message << std::endl;
    return 1;
}

// CLI11's parse errors, on one line, with the hint to --help.
std::string one_line(const std::string& text) {
    std::string out;
    for (char c : text) out += (c == '\n') ? ' ' : c;
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out;
}

// Runs fn(world) on every rank over MPI_COMM_WORLD; an error on any rank ends the whole job from
// that rank (one line naming the rank and host) instead of leaving the others in a collective.
template <typename Fn>
int run_on_world(const std::string& cmd, Fn fn) {
    using namespace bmoe;
    parallel::MpiEnvironment mpi;
    try {
        parallel::MpiComm world(MPI_COMM_WORLD);
        fn(world);
    } catch (const std::exception& e) {
        parallel::abort_job(cmd + ": " + e.what(), 1);
    }
    return 0;
}

// CPU threads per rank when not set (0) and OMP_NUM_THREADS is unset: the cores shared by the
// ranks on this node.
int threads_per_rank(int requested) {
    const bmoe::parallel::LaunchInfo launch = bmoe::parallel::launch_info();
    if (requested != 0 || std::getenv("OMP_NUM_THREADS") != nullptr || launch.local_size <= 1) return requested;
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / launch.local_size);
}

// One Trainer: in this process, or one per rank under mpirun/srun.
int run_training(const std::string& cmd, bmoe::trainer::RunConfig config) {
    using namespace bmoe;
    if (!parallel::launched_under_mpi()) {
        trainer::Trainer(config, std::cout).run();
        return 0;
    }
    return run_on_world(cmd, [&](parallel::Communicator& world) {
        config.train.threads = threads_per_rank(config.train.threads);
        trainer::Trainer(config, std::cout, &world).run();
    });
}

}  // namespace

int main(int argc, char** argv) {
    using namespace bmoe;
    model::use_fast_openblas_kernels(argv);
    CLI::App app{"bmoe: Mixture-of-Experts training with Bayesian routers (version " BMOE_VERSION ")", "bmoe"};
    app.require_subcommand(1);
    app.set_version_flag("--version", std::string(BMOE_VERSION));
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);

    // ---- bmoe train ----
    trainer::RunConfig config;
    trainer::RunConfigCli config_cli;
    bool print_config = false;
    CLI::App* train = app.add_subcommand("train", "train a MoE language model from scratch");
    train->add_flag("--print-config", print_config, "print the resolved config as TOML and exit");
    train->add_option("--config",
                      "TOML file with [model] [router] [optim] [loss] [data] [parallel] [checkpoint] [train] sections; "
                      "flags override it");
    trainer::add_run_options(*train, config, config_cli);

    // ---- bmoe finetune-router ----
    trainer::RunConfig finetune_config;
    trainer::RunConfigCli finetune_cli;
    std::string finetune_init;
    CLI::App* finetune = app.add_subcommand(
        "finetune-router",
        "train a (variational) router on top of a trained model: the model comes from --init, everything but the "
        "router is frozen");
    finetune->add_option("--init", finetune_init, "parent checkpoint (.h5) with the trained model")->required();
    finetune->add_option("--config", "TOML with [router] [loss] [optim] [data] [train] sections; flags override it");
    trainer::add_run_options(*finetune, finetune_config, finetune_cli);

    // ---- bmoe eval ----
    eval::EvalOptions eval_options;
    std::string eval_seed;
    bool eval_no_plot = false, eval_no_lm = false;
    CLI::App* eval_cmd = app.add_subcommand(
        "eval",
        "evaluate a checkpoint: LM loss per domain, MCQA accuracy/calibration, OoD detection, routing stability, "
        "expert usage; writes <out>/eval.json, eval.md and figures");
    eval_cmd->add_option("--ckpt", eval_options.checkpoint, "checkpoint (.h5), or a checkpoint directory (its latest)")
        ->required();
    eval_cmd
        ->add_option("--data", eval_options.data,
                     "extra token file (.bin) or `bmoe data` directory (val.bin, ood.bin) for the LM section; "
                     "repeatable")
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    eval_cmd
        ->add_option("--samples", eval_options.samples,
                     "routing samples S averaged in the router (0 = the checkpoint's router.eval_samples)")
        ->capture_default_str();
    eval_cmd->add_option("--mode", eval_options.mode, "sample (S samples) or mean (deterministic l = mu)")
        ->capture_default_str();
    eval_cmd->add_option("--questions", eval_options.questions, "questions per MCQA set")->capture_default_str();
    eval_cmd->add_option("--bins", eval_options.bins, "ECE bins (equal width)")->capture_default_str();
    eval_cmd->add_option("--bootstrap", eval_options.bootstrap, "bootstrap resamples for the ECE SE and noise floor")
        ->capture_default_str();
    eval_cmd->add_option("--out", eval_options.out_dir, "output directory (default: <ckpt dir>/<ckpt name>_eval)");
    eval_cmd->add_option("--backend", eval_options.backend, "cpu or cuda")->capture_default_str();
    eval_cmd->add_option("--ep", eval_options.ep, "expert-parallel group size (0 = all ranks)")->capture_default_str();
    eval_cmd->add_option("--threads", eval_options.threads, "CPU threads (0 = all cores)")->capture_default_str();
    eval_cmd->add_option("--seed", eval_seed, "question sets and routing noise (default: the checkpoint's train.seed)");
    eval_cmd
        ->add_option("--noise-scales", eval_options.noise_scales,
                     "routing-stability noise scales, x RMS of the hidden state (comma-separated, increasing)")
        ->delimiter(',')
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
        ->capture_default_str();
    eval_cmd
        ->add_option("--stability-seqs", eval_options.stability_sequences,
                     "validation sequences for the stability sweep (0 = skip it)")
        ->capture_default_str();
    eval_cmd->add_option("--batch", eval_options.batch_questions, "MCQA prompts per forward (global)")
        ->capture_default_str();
    eval_cmd
        ->add_option("--cloze", eval_options.cloze,
                     "real-text cloze sets: auto (skip with a warning when the text corpus is missing), "
                     "required or off")
        ->capture_default_str();
    eval_cmd->add_flag("--no-plot", eval_no_plot, "do not draw the figures");
    eval_cmd->add_flag("--no-lm", eval_no_lm, "skip the LM section on the checkpoint's corpus");

    // ---- bmoe comm-bench ----
    trainer::CommBenchOptions bench_options;
    CLI::App* bench_cmd = app.add_subcommand(
        "comm-bench",
        "communicator self-test: checks and times all-reduce and all-to-all on this launch's ranks (run it under "
        "mpirun/srun like training)");
    bench_cmd->add_option("--backend", bench_options.backend, "cpu or cuda (where the buffers live)")
        ->capture_default_str();
    bench_cmd->add_option("--comm", bench_options.comm, "auto | mpi | nccl, as --parallel.comm")->capture_default_str();
    bench_cmd->add_option("--min-bytes", bench_options.min_bytes, "smallest message per rank")->capture_default_str();
    bench_cmd->add_option("--max-bytes", bench_options.max_bytes, "largest message per rank")->capture_default_str();
    bench_cmd->add_option("--iters", bench_options.iters, "timed calls per size")->capture_default_str();
    bench_cmd->add_option("--warmup", bench_options.warmup, "untimed calls per size")->capture_default_str();

    // ---- bmoe data ----
    data::DataCommandOptions data_options;
    CLI::App* data_cmd = app.add_subcommand("data", "build token files (train/val/ood .bin) from a corpus");
    data::add_data_options(*data_cmd, data_options);

    // ---- bmoe ckpt inspect ----
    std::string inspect_path;
    CLI::App* ckpt = app.add_subcommand("ckpt", "checkpoint tools");
    CLI::App* inspect = ckpt->add_subcommand("inspect", "print a checkpoint's tree, shapes, config and step");
    inspect->add_option("file", inspect_path, "checkpoint file (.h5)")->required();
    trainer::RunConfig import_config;
    trainer::RunConfigCli import_cli;
    std::vector<std::string> import_files;
    std::string import_out;
    CLI::App* import = ckpt->add_subcommand(
        "import", "convert a Hugging Face MoE checkpoint (safetensors) into a bmoe checkpoint to train from");
    import->add_option("files", import_files, "the model's *.safetensors shards")->required();
    import->add_option("--out", import_out, "checkpoint to write (.h5)")->required();
    import->add_option("--config", "TOML with the [model] section matching the checkpoint");
    trainer::add_run_options(*import, import_config, import_cli);
    ckpt->require_subcommand(1);

    std::string cmd;
    try {
        const std::vector<std::string> args = trainer::expand_config_file(argc, argv);
        std::vector<const char*> cargs;
        for (const std::string& a : args) cargs.push_back(a.c_str());
        try {
            app.parse(static_cast<int>(cargs.size()), cargs.data());
        } catch (const CLI::CallForHelp& e) {
            return app.exit(e);
        } catch (const CLI::CallForVersion& e) {
            return app.exit(e);
        } catch (const CLI::ParseError& e) {
            for (CLI::App* sub : app.get_subcommands()) cmd = sub->get_name();
            return fail(cmd, one_line(e.what()) + " (see bmoe " + (cmd.empty() ? "" : cmd + " ") + "--help)");
        }
        if (train->parsed()) {
            cmd = "train";
            trainer::finish_cli_parse(config, config_cli);
            config.validate();
            if (print_config) {
                std::cout << config.to_toml();
                return 0;
            }
            return run_training(cmd, config);
        }
        if (finetune->parsed()) {
            cmd = "finetune-router";
            trainer::finish_cli_parse(finetune_config, finetune_cli);
            trainer::RunConfig config = trainer::finetune_router_config(finetune_config, finetune_init);
            return run_training(cmd, config);
        }
        if (eval_cmd->parsed()) {
            cmd = "eval";
            if (!eval_seed.empty()) {
                size_t used = 0;
                try {
                    eval_options.seed = std::stoull(eval_seed, &used);
                } catch (const std::exception&) {
                    used = 0;
                }
                BMOE_REQUIRE(used == eval_seed.size() && eval_seed[0] != '-', "--seed '", eval_seed,
                             "' is not a non-negative integer");
                eval_options.has_seed = true;
            }
            eval_options.plot = !eval_no_plot;
            eval_options.lm = !eval_no_lm;
            eval::validate_options(eval_options);
            if (!parallel::launched_under_mpi()) {
                eval::run_evaluation(eval_options, nullptr, std::cout);
                return 0;
            }
            return run_on_world(cmd, [&](parallel::Communicator& world) {
                eval_options.threads = threads_per_rank(eval_options.threads);
                eval::run_evaluation(eval_options, &world, std::cout);
            });
        }
        if (bench_cmd->parsed()) {
            cmd = "comm-bench";
            if (!parallel::launched_under_mpi()) {  // one process: no link crossed, but the setup is checked
                parallel::LocalComm local;
                trainer::run_comm_bench(bench_options, local, std::cout);
                return 0;
            }
            return run_on_world(
                cmd, [&](parallel::Communicator& world) { trainer::run_comm_bench(bench_options, world, std::cout); });
        }
        if (data_cmd->parsed()) {
            cmd = "data";
            return data::run_data_command(data_options);
        }
        if (import->parsed()) {
            cmd = "ckpt import";
            trainer::finish_cli_parse(import_config, import_cli);
            trainer::write_imported_checkpoint(import_files, import_config, import_out);
            std::cout << "wrote " << import_out << " (step 0): train from it with --checkpoint.resume=" << import_out
                      << std::endl;
            return 0;
        }
        if (inspect->parsed()) {
            cmd = "ckpt inspect";
            std::cout << checkpoints::describe_checkpoint(inspect_path);
            return 0;
        }
    } catch (const Error& e) {
        return fail(cmd, e.what());
    } catch (const std::exception& e) {
        return fail(cmd, std::string("unexpected failure: ") + e.what());
    }
    return 0;
}
