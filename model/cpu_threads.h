// cpu_threads.h -- one knob for the CPU backend's threads (OpenMP loops and OpenBLAS GEMMs).
#pragma once

namespace bmoe::model {

// n <= 0 means OMP_NUM_THREADS if set, else all cores. Sets both OpenMP's and OpenBLAS's thread counts.
void set_cpu_threads(int n);
int cpu_threads();

}  // namespace bmoe::model
