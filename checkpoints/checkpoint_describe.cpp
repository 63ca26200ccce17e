// checkpoint_describe.cpp -- describe_checkpoint: the human-readable tree behind `bmoe ckpt inspect`.
#include <algorithm>
#include <sstream>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/checkpoint_internal.h"
#include "checkpoints/h5_handles.h"

namespace bmoe::checkpoints {

namespace {

std::vector<std::string> link_names(hid_t group) {
    std::vector<std::string> names;
    auto cb = [](hid_t, const char* name, const H5L_info_t*, void* out) -> herr_t {
        static_cast<std::vector<std::string>*>(out)->push_back(name);
        return 0;
    };
    H5_CHECK(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, nullptr, cb, &names));
    return names;
}

std::string dtype_name(hid_t type) {
    H5T_class_t cls = H5Tget_class(type);
    size_t bits = H5Tget_size(type) * 8;
    if (cls == H5T_FLOAT) return "float" + std::to_string(bits);
    if (cls == H5T_INTEGER) return (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
    return "other";
}

void describe_group(hid_t group, const std::string& prefix, int depth, std::ostringstream& os) {
    const std::string indent(2 * depth, ' ');
    for (const std::string& name : link_names(group)) {
        H5Object obj(H5_CHECK(H5Oopen(group, name.c_str(), H5P_DEFAULT)));
        const std::string path = prefix + "/" + name;
        if (H5Iget_type(obj) == H5I_GROUP) {
            os << indent << path << "/\n";
            describe_group(obj, path, depth + 1, os);
        } else if (H5Iget_type(obj) == H5I_DATASET) {
            H5Space space(H5_CHECK(H5Dget_space(obj)));
            int ndims = H5_CHECK(H5Sget_simple_extent_ndims(space));
            std::vector<hsize_t> dims(static_cast<size_t>(ndims));
            H5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
            H5Type type(H5_CHECK(H5Dget_type(obj)));
            os << indent << path << "  " << dtype_name(type) << " [";
            for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
            os << "]";
            if (h5_has_attr(obj, detail::kChecksumAttr)) {
                char hex[16];
                std::snprintf(hex, sizeof(hex), "%08llx",
                              static_cast<unsigned long long>(h5_read_attr_u64(obj, detail::kChecksumAttr)));
                os << "  crc32=" << hex;
            }
            os << "\n";
        }
    }
}

}  // namespace

std::string describe_checkpoint(const std::string& path) {
    CheckpointInfo info = read_checkpoint_info(path);
    std::ostringstream os;
    os << "checkpoint " << path << "\n";
    os << "  format_version " << info.format_version << (info.format_version == kFormatVersion ? "" : " (unsupported)")
       << ", bmoe_version " << info.bmoe_version << ", step " << info.step << "\n";
    os << "  parent: " << (info.parent.empty() ? "(none)" : info.parent) << "\n";
    for (const auto& [key, value] : info.extra) os << "  extra." << key << ": " << value << "\n";
    size_t lines = std::count(info.config_toml.begin(), info.config_toml.end(), '\n');
    std::string head = info.config_toml.substr(0, info.config_toml.find('\n'));
    if (head.size() > 60) head = head.substr(0, 57) + "...";
    os << "  config_toml: " << info.config_toml.size() << " bytes, " << lines << " lines"
       << (head.empty() ? "" : " (first: \"" + head + "\")") << "\n";
    H5File file = detail::open_for_read(path);
    describe_group(file, "", 1, os);
    return os.str();
}

}  // namespace bmoe::checkpoints
