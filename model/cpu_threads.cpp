#include "model/cpu_threads.h"

#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include <cstdlib>

extern "C" char* openblas_get_corename(void);

namespace bmoe::model {

std::string better_openblas_core(const std::string& detected, bool avx512, bool avx2_fma) {
    // OpenBLAS's fallbacks for CPUs it does not recognise
    if (detected != "Prescott" && detected != "Core2" && detected != "Katmai") return "";
    if (avx512) return "SkylakeX";
    if (avx2_fma) return "Haswell";
    return "";
}

std::string openblas_kernels() { return openblas_get_corename(); }

void use_fast_openblas_kernels(char** argv) {
    if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;  // the user's choice, or already re-executed
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const std::string core = better_openblas_core(openblas_get_corename(), avx512, avx2_fma);
    if (core.empty()) return;
    setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
    execv("/proc/self/exe", argv);  // returns only on failure
}

void set_cpu_threads(int n) {
    // 0: OMP_NUM_THREADS when set (launchers divide the cores among local ranks), else all cores.
    if (n <= 0) n = std::getenv("OMP_NUM_THREADS") != nullptr ? omp_get_max_threads() : omp_get_num_procs();
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int cpu_threads() { return omp_get_max_threads(); }

}  // namespace bmoe::model
