// h5_handles.cpp -- HDF5 error silencing and the attribute helpers (see h5_handles.h).
#include "checkpoints/h5_handles.h"

#include <mutex>
#include <vector>

namespace bmoe::checkpoints {

void h5_silence_errors() {
    static std::once_flag once;
    std::call_once(once, [] { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); });
}

std::string h5_error_message() {
    std::string msg;
    auto walk = [](unsigned n, const H5E_error2_t* err, void* out) -> herr_t {
        if (n == 0 && err && err->desc)
            *static_cast<std::string*>(out) = std::string(err->func_name ? err->func_name : "?") + ": " + err->desc;
        return 0;
    };
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk, &msg);
    return msg.empty() ? "failed" : msg;
}

H5Plist h5_file_access() {
    H5Plist fapl(H5_CHECK(H5Pcreate(H5P_FILE_ACCESS)));
    H5_CHECK(H5Pset_file_locking(fapl, true, true));
    return fapl;
}

namespace {

H5Type vlen_utf8_type() {
    H5Type type(H5_CHECK(H5Tcopy(H5T_C_S1)));
    H5_CHECK(H5Tset_size(type, H5T_VARIABLE));
    H5_CHECK(H5Tset_cset(type, H5T_CSET_UTF8));
    return type;
}

H5Attr create_attr(hid_t loc, const std::string& name, hid_t file_type, hid_t space) {
    if (H5_CHECK(H5Aexists(loc, name.c_str())) > 0) H5_CHECK(H5Adelete(loc, name.c_str()));
    return H5Attr(H5_CHECK(H5Acreate2(loc, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT)));
}

}  // namespace

void h5_write_attr(hid_t loc, const std::string& name, const std::string& value) {
    H5Type type = vlen_utf8_type();
    H5Space space(H5_CHECK(H5Screate(H5S_SCALAR)));
    H5Attr attr = create_attr(loc, name, type, space);
    const char* ptr = value.c_str();
    H5_CHECK(H5Awrite(attr, type, &ptr));
}

void h5_write_attr(hid_t loc, const std::string& name, int64_t value) {
    H5Space space(H5_CHECK(H5Screate(H5S_SCALAR)));
    H5Attr attr = create_attr(loc, name, H5T_STD_I64LE, space);
    H5_CHECK(H5Awrite(attr, H5T_NATIVE_INT64, &value));
}

void h5_write_attr_u64(hid_t loc, const std::string& name, uint64_t value) {
    H5Space space(H5_CHECK(H5Screate(H5S_SCALAR)));
    H5Attr attr = create_attr(loc, name, H5T_STD_U64LE, space);
    H5_CHECK(H5Awrite(attr, H5T_NATIVE_UINT64, &value));
}

bool h5_has_attr(hid_t loc, const std::string& name) { return H5_CHECK(H5Aexists(loc, name.c_str())) > 0; }

std::string h5_read_attr_string(hid_t loc, const std::string& name) {
    H5Attr attr(H5_CHECK(H5Aopen(loc, name.c_str(), H5P_DEFAULT)));
    H5Type file_type(H5_CHECK(H5Aget_type(attr)));
    BMOE_REQUIRE(H5Tget_class(file_type) == H5T_STRING, "attribute '", name, "' is not a string");
    if (H5_CHECK(H5Tis_variable_str(file_type)) > 0) {
        H5Type mem = vlen_utf8_type();
        char* ptr = nullptr;
        H5_CHECK(H5Aread(attr, mem, &ptr));
        std::string out = ptr ? ptr : "";
        H5free_memory(ptr);
        return out;
    }
    // Fixed-length strings (files written by other tools).
    size_t size = H5Tget_size(file_type);
    H5Type mem(H5_CHECK(H5Tcopy(H5T_C_S1)));
    H5_CHECK(H5Tset_size(mem, size + 1));
    std::vector<char> buf(size + 1, '\0');
    H5_CHECK(H5Aread(attr, mem, buf.data()));
    return std::string(buf.data());
}

int64_t h5_read_attr_int(hid_t loc, const std::string& name) {
    H5Attr attr(H5_CHECK(H5Aopen(loc, name.c_str(), H5P_DEFAULT)));
    H5Type file_type(H5_CHECK(H5Aget_type(attr)));
    BMOE_REQUIRE(H5Tget_class(file_type) == H5T_INTEGER, "attribute '", name, "' is not an integer");
    int64_t value = 0;
    H5_CHECK(H5Aread(attr, H5T_NATIVE_INT64, &value));
    return value;
}

uint64_t h5_read_attr_u64(hid_t loc, const std::string& name) {
    H5Attr attr(H5_CHECK(H5Aopen(loc, name.c_str(), H5P_DEFAULT)));
    H5Type file_type(H5_CHECK(H5Aget_type(attr)));
    BMOE_REQUIRE(H5Tget_class(file_type) == H5T_INTEGER, "attribute '", name, "' is not an integer");
    uint64_t value = 0;
    H5_CHECK(H5Aread(attr, H5T_NATIVE_UINT64, &value));
    return value;
}

bool h5_path_exists(hid_t file, const std::string& path) {
    // H5Lexists needs every intermediate component to exist, so walk the path one link at a time.
    size_t pos = 0;
    while (pos < path.size()) {
        size_t next = path.find('/', pos + 1);
        std::string prefix = path.substr(0, next);
        if (!prefix.empty() && prefix != "/" && H5_CHECK(H5Lexists(file, prefix.c_str(), H5P_DEFAULT)) <= 0)
            return false;
        if (next == std::string::npos) break;
        pos = next;
    }
    return true;
}

}  // namespace bmoe::checkpoints
