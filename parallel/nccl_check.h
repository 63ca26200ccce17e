// nccl_check.h -- NCCL_CHECK: throws bmoe::Error when an NCCL call does not return ncclSuccess.
// The message names NCCL, the statement, file:line, ncclGetErrorString's text and NCCL's detail
// for the last failure (ncclGetLastError). Kept apart from check.h so that code which never talks
// to NCCL does not need nccl.h; include it only from files built with the CUDA/NCCL headers.
#pragma once

#include <nccl.h>

#include <string>

#include "parallel/check.h"

namespace bmoe::parallel {

// "unhandled system error: <detail>" -- NCCL's text for a result code plus its last error message.
inline std::string nccl_error_string(ncclResult_t result) {
    std::string text = ncclGetErrorString(result);
    const char* detail = ncclGetLastError(nullptr);  // the comm argument is unused by NCCL
    if (detail != nullptr && detail[0] != '\0') text += concat(": ", detail);
    return text;
}

}  // namespace bmoe::parallel

#define NCCL_CHECK(expr) BMOE_CHECK_GEN((expr), ncclSuccess, ::bmoe::parallel::nccl_error_string, "NCCL")
