// PEM armouring of DER blobs for the SDK's value types (internal).
#ifndef MANDATE_SDK_SRC_PEM_H_
#define MANDATE_SDK_SRC_PEM_H_

#include <string>
#include <string_view>

namespace mandate::sdk_internal {

// "-----BEGIN <label>-----\n" + base64 in 64-column lines + "-----END <label>-----\n".
std::string PemEncode(std::string_view label, std::string_view der);

}  // namespace mandate::sdk_internal

#endif  // MANDATE_SDK_SRC_PEM_H_
