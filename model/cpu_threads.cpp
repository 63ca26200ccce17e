#include "model/cpu_threads.h"

#include <cblas.h>
#include <omp.h>

#include <cstdlib>

namespace bmoe::model {

void set_cpu_threads(int n) {
    // 0: OMP_NUM_THREADS when set (launchers divide the cores among local ranks), else all cores.
    if (n <= 0) n = std::getenv("OMP_NUM_THREADS") != nullptr ? omp_get_max_threads() : omp_get_num_procs();
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int cpu_threads() { return omp_get_max_threads(); }

}  // namespace bmoe::model
