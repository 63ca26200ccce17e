// cuda_check.h -- CUDA_CHECK / CUBLAS_CHECK / CUDA_CHECK_LAST: throw bmoe::Error on a failed call.
// The message names the library, the statement, file:line and the library's error string.
// Include only from .cu files (or .cpp files that already depend on the CUDA headers).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "parallel/check.h"

#define CUDA_CHECK(expr) BMOE_CHECK_GEN((expr), cudaSuccess, cudaGetErrorString, "CUDA")
#define CUBLAS_CHECK(expr) BMOE_CHECK_GEN((expr), CUBLAS_STATUS_SUCCESS, cublasGetStatusString, "cuBLAS")
// After a kernel launch: catches bad launch configurations (asynchronous faults surface at the
// next synchronizing call, which is checked too).
#define CUDA_CHECK_LAST() CUDA_CHECK(cudaGetLastError())
