// mpi_gtest_main.cpp -- main() for GoogleTest binaries run under mpiexec (tests/CMakeLists.txt
// bmoe_add_mpi_test links it). Every rank runs every test; rank 0 prints the usual report, the
// other ranks print only their failures (prefixed with the rank), and the exit code is the worst
// over ranks, so ctest fails when any rank fails. Ranks run on bmoe's OpenBLAS kernels, as the
// single-process tests do (tests/gtest_main.cpp).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>

#include "model/cpu_threads.h"
#include "parallel/check.h"
#include "parallel/mpi_env.h"

namespace {

class FailurePrinter : public ::testing::EmptyTestEventListener {
  public:
    explicit FailurePrinter(int rank) : rank_(rank) {}
    // NOTES: remember the test here; UnitTest::current_test_info() inside OnTestPartResult would
    // deadlock on gtest's own mutex.
    void OnTestStart(const ::testing::TestInfo& test) override {
        test_name_ = std::string(test.test_suite_name()) + "." + test.name();
    }
    void OnTestPartResult(const ::testing::TestPartResult& result) override {
        if (!result.failed()) return;
        std::fprintf(stderr, "[rank %d] %s failed at %s:%d\n%s\n", rank_, test_name_.c_str(),
                     result.file_name() ? result.file_name() : "?", result.line_number(), result.message());
        std::fflush(stderr);
    }

  private:
    int rank_;
    std::string test_name_ = "(outside a test)";
};

}  // namespace

int main(int argc, char** argv) {
    bmoe::model::use_fast_openblas_kernels(argv);  // before MPI_Init: it may re-execute the rank
    try {
        bmoe::parallel::MpiEnvironment mpi(&argc, &argv);
        ::testing::InitGoogleTest(&argc, argv);
        int rank = 0;
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        if (rank != 0) {
            ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
            delete listeners.Release(listeners.default_result_printer());
            listeners.Append(new FailurePrinter(rank));
        }
        int rc = RUN_ALL_TESTS();
        int worst_rc = rc;
        MPI_Allreduce(&rc, &worst_rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        return worst_rc;
    } catch (const bmoe::Error& e) {
        bmoe::parallel::abort_job(e.what(), 1);
    }
}
