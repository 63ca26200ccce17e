// process_util.h -- what the tests that drive a Python reference share: a temporary directory and
// running a shell command with its output captured.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace bmoe::testing {

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
struct TempDir {
    std::filesystem::path path;
    explicit TempDir(const std::string& prefix = "bmoe_test") {
        std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
        char* made = mkdtemp(pattern.data());
        if (made == nullptr) throw std::runtime_error("mkdtemp failed");
        path = made;
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
};

// Runs a shell command with stdout and stderr into log_path; returns the exit status and the output.
inline int run_command(const std::string& command, const std::filesystem::path& log_path, std::string* output) {
    const int status = std::system((command + " > '" + log_path.string() + "' 2>&1").c_str());
    std::ifstream log(log_path);
    std::stringstream ss;
    ss << log.rdbuf();
    *output = ss.str();
    return status;
}

}  // namespace bmoe::testing
