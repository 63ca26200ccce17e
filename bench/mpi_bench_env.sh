# shellcheck shell=bash disable=SC2034  # sourced: its variables are for the sourcing script
# mpi_bench_env.sh -- sourced by the multi-rank CPU benchmarks (bench_ep.sh, bench_overlap.sh):
# the bmoe binary (built by tools/build.sh when missing), Open MPI settings for root and more ranks
# than cores, and the default comparison model's flags in `model_args`.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
bin=./build/launch/bmoe
[[ -x $bin ]] || bash tools/build.sh >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
       OMPI_MCA_btl_vader_single_copy_mechanism=none
model_args=(--model.d_model=256 --model.num_layers=4 --model.num_heads=4 --model.num_experts=8 --model.top_k=2
            --model.expert_hidden=512 --data.batch_size=8 --data.seq_len=256 --data.train_tokens=400000
            --train.eval_batches=1 --train.plot=false)
