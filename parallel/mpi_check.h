// mpi_check.h -- MPI_CHECK: throws bmoe::Error when an MPI call does not return MPI_SUCCESS.
// The message names MPI, the statement, file:line and MPI_Error_string's text. Kept apart from
// check.h so that code which never talks to MPI does not need mpi.h. MPI only returns error codes
// on communicators whose error handler is MPI_ERRORS_RETURN (MpiEnvironment sets it on
// MPI_COMM_WORLD; communicators split from it inherit it); under the default
// MPI_ERRORS_ARE_FATAL a failed call aborts the job inside MPI.
#pragma once

#include <mpi.h>

#include <string>

#include "parallel/check.h"

namespace bmoe::parallel {

// MPI's text for an error code ("MPI_ERR_COUNT: invalid count argument", ...).
inline std::string mpi_error_string(int code) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return concat("unknown MPI error code ", code);
    return std::string(text, length);
}

}  // namespace bmoe::parallel

#define MPI_CHECK(expr) BMOE_CHECK_GEN((expr), MPI_SUCCESS, ::bmoe::parallel::mpi_error_string, "MPI")
