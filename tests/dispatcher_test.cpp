// dispatcher_test.cpp -- ExpertDispatcher under mpiexec: rows reach the rank that owns their
// expert, grouped by local expert, and combine() brings every row back to its slot exactly.
// Rows carry their provenance (source rank, row index, column), so each receiver checks where
// every value came from; routings are random per seed, with empty experts and silent ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <random>
#include <vector>

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

TEST(ExpertDispatcher, RoundTripIsExactAndRowsReachTheirExperts) {
    MpiComm world(MPI_COMM_WORLD);
    const int P = world.size(), me = world.rank(), D = 3;
    for (int E : {P, 2 * P, 4 * P}) {
        const int El = E / P;
        ExpertDispatcher dispatcher(world, E);
        for (int seed = 0; seed < 12; ++seed) {
            const std::vector<int> counts = rows_per_expert(me, E, seed);
            std::vector<int> offsets(E + 1, 0);
            for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
            const int R = offsets[E];
            std::vector<float> x(static_cast<size_t>(R) * D);
            for (int r = 0; r < R; ++r)
                for (int c = 0; c < D; ++c) x[static_cast<size_t>(r) * D + c] = provenance(me, r, c);

            std::vector<float> local;
            const DispatchHandle h = dispatcher.dispatch(x.data(), offsets, D, local);
            // Expected local rows: for each of my experts, every source rank's rows in order.
            std::vector<float> expected;
            std::vector<int> expected_offsets(El + 1, 0);
            for (int le = 0; le < El; ++le) {
                const int e = me * El + le;
                for (int s = 0; s < P; ++s) {
                    const std::vector<int> sc = rows_per_expert(s, E, seed);
                    int first = 0;
                    for (int k = 0; k < e; ++k) first += sc[k];
                    for (int i = 0; i < sc[e]; ++i)
                        for (int c = 0; c < D; ++c) expected.push_back(provenance(s, first + i, c));
                    expected_offsets[le + 1] += sc[e];
                }
                expected_offsets[le + 1] += expected_offsets[le];
            }
            ASSERT_EQ(h.local_expert_offsets, expected_offsets) << "E " << E << " seed " << seed;
            ASSERT_EQ(local, expected) << "E " << E << " seed " << seed;

            // Experts "compute" y = 2x + 1; combine must return it to the original slots.
            for (float& v : local) v = 2.0f * v + 1.0f;
            std::vector<float> y(x.size(), -1.0f);
            dispatcher.combine(h, local.data(), D, y.data());
            for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(y[i], 2.0f * x[i] + 1.0f) << i;

            // forward() moves a second tensor exactly like dispatch() moved x.
            std::vector<float> again;
            dispatcher.forward(h, x.data(), D, again);
            ASSERT_EQ(again, expected);
        }
    }
}

TEST(ExpertDispatcher, IndivisibleExpertCountIsAClearError) {
    MpiComm world(MPI_COMM_WORLD);
    if (world.size() == 1) GTEST_SKIP() << "needs >= 2 ranks";
    EXPECT_THROW(ExpertDispatcher(world, world.size() + 1), bmoe::Error);
}

}  // namespace
}  // namespace bmoe::parallel
