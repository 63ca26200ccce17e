// check.h -- bmoe's single error type and the CHECK/ASSERT macro family.
//
// Library code never calls exit(): it throws bmoe::Error, so tests can EXPECT_THROW and the
// launcher can print one line (prefixed with the rank) and MPI_Abort the job.
//   BMOE_CHECK_GEN(expr, ok, to_string, lib)  generic "call returned an error code" check
//   MPI_CHECK / H5_CHECK / CUDA_CHECK / CUBLAS_CHECK / NCCL_CHECK  library wrappers
//   BMOE_ASSERT(cond, msg...)   internal invariant (a bmoe bug if it fires)
//   BMOE_REQUIRE(cond, msg...)  user-facing precondition: msg must say what to change
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace bmoe {

class Error : public std::runtime_error {
  public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& first, const Rest&... rest) {
    os << first;
    append_all(os, rest...);
}
}  // namespace detail

// Builds a message from any streamable pieces: bmoe::concat("got ", n, " experts").
template <typename... Args>
std::string concat(const Args&... args) {
    std::ostringstream os;
    detail::append_all(os, args...);
    return os.str();
}

[[noreturn]] inline void fail_call(
    const char* lib, const char* expr, const char* file, int line, const std::string& msg) {
    throw Error(concat(lib, " error: ", msg, " (", expr, " at ", file, ":", line, ")"));
}

}  // namespace bmoe

#define BMOE_CHECK_GEN(expr, ok, to_string, lib)                                          \
    do {                                                                                  \
        auto bmoe_check_rc_ = (expr);                                                     \
        if (bmoe_check_rc_ != (ok)) {                                                     \
            ::bmoe::fail_call(lib, #expr, __FILE__, __LINE__, to_string(bmoe_check_rc_)); \
        }                                                                                 \
    } while (0)

// User-facing: the message is the whole one-line error, so it must name the problem and the fix.
#define BMOE_REQUIRE(cond, ...)                                        \
    do {                                                               \
        if (!(cond)) throw ::bmoe::Error(::bmoe::concat(__VA_ARGS__)); \
    } while (0)

// Internal invariant: carries file:line because it is a bug report, not a usage error.
#define BMOE_ASSERT(cond, ...)                                                                                    \
    do {                                                                                                          \
        if (!(cond))                                                                                              \
            throw ::bmoe::Error(::bmoe::concat("internal error: ", #cond, " failed at ", __FILE__, ":", __LINE__, \
                                               ": ", ##__VA_ARGS__));                                             \
    } while (0)
