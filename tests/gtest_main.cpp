// gtest_main.cpp -- main() for the single-process GoogleTest binaries (bmoe_add_test links it).
// Tests run on the same OpenBLAS kernels as bmoe itself (model/cpu_threads.h), so their numerics
// and run times do not depend on whether OpenBLAS recognises the CI machine's CPU.
#include <gtest/gtest.h>

#include "model/cpu_threads.h"

int main(int argc, char** argv) {
    bmoe::model::use_fast_openblas_kernels(argv);
    ::testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}
