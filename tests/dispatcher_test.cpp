// dispatcher_test.cpp -- ExpertDispatcher and ExpertExchange under mpiexec: rows reach the rank
// that owns their expert, grouped by local expert, and come back to their slots exactly.
// Rows carry their provenance (source rank, row index, column), so each receiver checks where
// every value came from; routings are random per seed, with empty experts and silent ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <random>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "model/expert_exchange.h"
#include "model/precision.h"
#include "parallel/check.h"
#include "parallel/expert_dispatcher.h"
#include "parallel/mpi_comm.h"

namespace bmoe::parallel {
namespace {

float provenance(int rank, int row, int col) { return static_cast<float>(rank * 100000 + row * 16 + col); }

// Rows per global expert sent by `rank` (every rank can recompute any rank's routing).
std::vector<int> rows_per_expert(int rank, int E, int seed) {
    std::mt19937 gen(static_cast<unsigned>(seed * 7919 + rank));
    std::vector<int> counts(E);
    for (int e = 0; e < E; ++e) counts[e] = (gen() % 3 == 0) ? 0 : static_cast<int>(gen() % 5);
    if (seed % 4 == 1 && rank == 0) counts.assign(E, 0);  // a rank that sends nothing
    return counts;
}

// Expected rows of this rank's experts, sorted by (local expert, source rank), and their offsets.
void expected_local_rows(int me, int P, int E, int D, int seed, std::vector<float>& rows, std::vector<int>& offsets) {
    const int El = E / P;
    rows.clear();
    offsets.assign(El + 1, 0);
    for (int le = 0; le < El; ++le) {
        const int e = me * El + le;
        for (int s = 0; s < P; ++s) {
            const std::vector<int> sc = rows_per_expert(s, E, seed);
            int first = 0;
            for (int k = 0; k < e; ++k) first += sc[k];
            for (int i = 0; i < sc[e]; ++i)
                for (int c = 0; c < D; ++c) rows.push_back(provenance(s, first + i, c));
            offsets[le + 1] += sc[e];
        }
        offsets[le + 1] += offsets[le];
    }
}

struct Routing {
    std::vector<int> offsets;  // [E+1]
    std::vector<float> x;      // [R, D] provenance rows
};

Routing make_routing(int me, int E, int D, int seed) {
    const std::vector<int> counts = rows_per_expert(me, E, seed);
    Routing r;
    r.offsets.assign(E + 1, 0);
    for (int e = 0; e < E; ++e) r.offsets[e + 1] = r.offsets[e] + counts[e];
    const int R = r.offsets[E];
    r.x.resize(static_cast<size_t>(R) * D);
    for (int row = 0; row < R; ++row)
        for (int c = 0; c < D; ++c) r.x[static_cast<size_t>(row) * D + c] = provenance(me, row, c);
    return r;
}

TEST(ExpertDispatcher, RowsReachTheirExpertsAndComeBackExactly) {
    MpiComm world(MPI_COMM_WORLD);
    const int P = world.size(), me = world.rank(), D = 3;
    for (int E : {P, 2 * P, 4 * P}) {
        ExpertDispatcher dispatcher(world, E);
        for (int seed = 0; seed < 12; ++seed) {
            const Routing routing = make_routing(me, E, D, seed);
            const DispatchHandle h = dispatcher.plan(routing.offsets);
            ASSERT_EQ(h.num_sent_rows(), routing.offsets[E]);
            std::vector<float> received(static_cast<size_t>(h.num_local_rows()) * D);
            dispatcher.send_to_experts(h, routing.x.data(), D, received.data());
            // the handle's permutation regroups received rows by local expert
            std::vector<float> local(received.size());
            for (size_t r = 0; r < h.received_to_sorted.size(); ++r) {
                ASSERT_EQ(h.sorted_to_received[h.received_to_sorted[r]], static_cast<int32_t>(r));
                std::copy_n(received.data() + r * D, D,
                            local.data() + static_cast<size_t>(h.received_to_sorted[r]) * D);
            }
            std::vector<float> expected;
            std::vector<int> expected_offsets;
            expected_local_rows(me, P, E, D, seed, expected, expected_offsets);
            ASSERT_EQ(h.local_expert_offsets, expected_offsets) << "E " << E << " seed " << seed;
            ASSERT_EQ(local, expected) << "E " << E << " seed " << seed;

            for (float& v : received) v = 2.0f * v + 1.0f;  // experts "compute" y = 2x + 1
            std::vector<float> y(routing.x.size(), -1.0f);
            dispatcher.return_to_senders(h, received.data(), D, y.data());
            for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], 2.0f * routing.x[i] + 1.0f) << i;
        }
    }
}

// ExpertExchange on the CPU backend, rows passed straight to MPI and staged through host copies
// (the path of CUDA + MPI runs): the same rows arrive, sorted by local expert, and come back.
TEST(ExpertExchange, DirectAndStagedPathsMoveRowsExactly) {
    MpiComm world(MPI_COMM_WORLD);
    const int P = world.size(), me = world.rank(), D = 5;
    auto backend = model::make_backend("cpu");
    for (bool staged : {false, true}) {
        const int E = 2 * P;
        model::ExpertExchange exchange(world, E, backend.get(), staged);
        ASSERT_EQ(exchange.staged(), staged);
        for (int seed = 0; seed < 8; ++seed) {
            const Routing routing = make_routing(me, E, D, seed);
            const size_t R = routing.x.size() / D;
            model::Buffer<float> x(backend.get(), R * D), y(backend.get(), R * D), local, again;
            x.upload(routing.x);
            const DispatchHandle& h = exchange.dispatch(x.data(), routing.offsets, D, local);
            const size_t L = static_cast<size_t>(h.num_local_rows());
            std::vector<float> expected;
            std::vector<int> expected_offsets;
            expected_local_rows(me, P, E, D, seed, expected, expected_offsets);
            ASSERT_EQ(h.local_expert_offsets, expected_offsets);
            std::vector<float> got = local.download();
            got.resize(L * D);
            ASSERT_EQ(got, expected) << "staged " << staged << " seed " << seed;

            exchange.forward(x.data(), D, again);  // a second tensor moves like the first
            got = again.download();
            got.resize(L * D);
            ASSERT_EQ(got, expected);

            for (float& v : got) v = 2.0f * v + 1.0f;
            if (L > 0) backend->upload(local.data(), got.data(), L * D * sizeof(float));
            exchange.combine(local.data(), D, y.data());
            const std::vector<float> back = y.download();
            for (size_t i = 0; i < routing.x.size(); ++i) ASSERT_EQ(back[i], 2.0f * routing.x[i] + 1.0f) << i;
        }
    }
}

// bf16 transport (rows that only feed bf16 GEMMs): fp32 rows arrive as exactly their bf16
// roundings, directly and staged, and the bytes that crossed a link are half those of fp32 rows.
// Rows already in bf16 (the gather writes the experts' rows in bf16) move bit for bit into the
// caller's buffer, each where the fp32 path puts it. The experts' outputs return as their bf16
// roundings too where asked (combine as_bf16). An odd width cannot travel as 32-bit words.
TEST(ExpertExchange, Bf16RowsArriveAsTheirRoundingWithHalfTheBytes) {
    MpiComm world(MPI_COMM_WORLD);
    const int P = world.size(), me = world.rank(), D = 6;
    auto backend = model::make_backend("cpu");
    backend->set_matmul_precision(model::MatmulPrecision::kBf16);
    for (bool staged : {false, true}) {
        const int E = 2 * P;
        model::ExpertExchange exchange(world, E, backend.get(), staged);
        for (int seed = 0; seed < 6; ++seed) {
            const Routing routing = make_routing(me, E, D, seed);
            std::vector<float> x = routing.x;  // values that bf16 cannot hold exactly
            for (size_t i = 0; i < x.size(); ++i) x[i] = x[i] * 1.0009765625f + 0.123f;
            model::Buffer<float> x_dev(backend.get(), x.size()), fp32_rows, bf16_rows;
            x_dev.upload(x);
            const DispatchHandle& h = exchange.dispatch(x_dev.data(), routing.offsets, D, fp32_rows);
            const int64_t fp32_bytes = exchange.take_bytes_sent();
            exchange.forward(x_dev.data(), D, bf16_rows, /*as_bf16=*/true);
            const int64_t bf16_bytes = exchange.take_bytes_sent();
            const size_t L = static_cast<size_t>(h.num_local_rows()) * D;
            std::vector<float> exact = fp32_rows.download(), got = bf16_rows.download();
            for (size_t i = 0; i < L; ++i) ASSERT_EQ(got[i], model::round_to_bf16(exact[i])) << "staged " << staged;
            EXPECT_EQ(2 * bf16_bytes, fp32_bytes);
            int64_t expected = 0;
            for (int p = 0; p < P; ++p) expected += p == me ? 0 : h.send_rows[p] * D * 4;
            EXPECT_EQ(fp32_bytes, expected) << "only rows leaving this rank count";

            model::Buffer<uint16_t> x16(backend.get(), x.size()), local16(backend.get(), L + 1);  // + 1: a sentinel
            backend->float_to_bf16(x16.data(), x_dev.data(), x.size());
            local16.upload(std::vector<uint16_t>(L + 1, 0xbeef));
            exchange.forward(x16.data(), D, local16.data());
            EXPECT_EQ(exchange.take_bytes_sent(), bf16_bytes);
            const std::vector<uint16_t> got16 = local16.download();
            for (size_t i = 0; i < L; ++i) ASSERT_EQ(got16[i], model::bf16_bits(exact[i])) << "staged " << staged;
            EXPECT_EQ(got16[L], 0xbeef) << "wrote past the rows";

            // the way back: y = 3x - 0.7, fp32 and rounded to bf16 for the trip
            for (float& v : exact) v = 3.0f * v - 0.7f;
            fp32_rows.upload(exact);
            model::Buffer<float> y32(backend.get(), x.size()), y16(backend.get(), x.size());
            exchange.combine(fp32_rows.data(), D, y32.data());
            const int64_t y32_bytes = exchange.take_bytes_sent();
            exchange.combine(fp32_rows.data(), D, y16.data(), /*as_bf16=*/true);
            EXPECT_EQ(2 * exchange.take_bytes_sent(), y32_bytes);
            const std::vector<float> want = y32.download(), back = y16.download();
            for (size_t i = 0; i < x.size(); ++i)
                ASSERT_EQ(back[i], model::round_to_bf16(want[i])) << "staged " << staged;
        }
        std::vector<uint16_t> odd(8);
        EXPECT_THROW(exchange.forward(odd.data(), 3, odd.data()), bmoe::Error);
    }
}

TEST(ExpertDispatcher, IndivisibleExpertCountIsAClearError) {
    MpiComm world(MPI_COMM_WORLD);
    if (world.size() == 1) GTEST_SKIP() << "needs >= 2 ranks";
    EXPECT_THROW(ExpertDispatcher(world, world.size() + 1), bmoe::Error);
}

}  // namespace
}  // namespace bmoe::parallel
