// Strict JSON parsing for untrusted input (ParseStrictJson in jose.h).
#include "nlohmann/json.hpp"

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/common/jose/jose.h"

namespace mandate::jose {
namespace {

using json = nlohmann::json;

// nlohmann's DOM builder, counting the member names it is handed. The DOM keeps one member per
// name (the last), so the document had a duplicate exactly when more names were read than the
// finished objects hold; counting costs no allocation on the hot path (every token and proof).
class CountingDomSax {
 public:
  explicit CountingDomSax(json& root) : dom_(root, /*allow_exceptions_=*/false) {}

  bool null() { return dom_.null(); }
  bool boolean(bool value) { return dom_.boolean(value); }
  bool number_integer(json::number_integer_t value) { return dom_.number_integer(value); }
  bool number_unsigned(json::number_unsigned_t value) { return dom_.number_unsigned(value); }
  bool number_float(json::number_float_t value, const json::string_t& text) {
    return dom_.number_float(value, text);
  }
  bool string(json::string_t& value) { return dom_.string(value); }
  bool binary(json::binary_t& value) { return dom_.binary(value); }
  bool start_object(std::size_t size) { return dom_.start_object(size); }
  bool key(json::string_t& name) {
    ++names_read_;
    return dom_.key(name);
  }
  bool end_object() { return dom_.end_object(); }
  bool start_array(std::size_t size) { return dom_.start_array(size); }
  bool end_array() { return dom_.end_array(); }
  template <class Exception>
  bool parse_error(std::size_t position, const std::string& last_token, const Exception& error) {
    return dom_.parse_error(position, last_token, error);
  }

  size_t names_read() const { return names_read_; }

 private:
  nlohmann::detail::json_sax_dom_parser<json> dom_;
  size_t names_read_ = 0;
};

// Members of every object in `root`, iteratively (a hostile document may nest deeply).
size_t CountMembers(const json& root) {
  size_t members = 0;
  std::vector<const json*> pending = {&root};
  while (!pending.empty()) {
    const json* value = pending.back();
    pending.pop_back();
    if (value->is_object()) members += value->size();
    for (const json& child : *value) {
      if (child.is_structured()) pending.push_back(&child);
    }
  }
  return members;
}

}  // namespace

absl::StatusOr<json> ParseStrictJson(std::string_view text) {
  json root;
  CountingDomSax sax(root);
  bool parsed = false;
  try {
    parsed = json::sax_parse(text, &sax, json::input_format_t::json, /*strict=*/true,
                             /*ignore_comments=*/false);
  } catch (const json::exception&) {
    // The DOM builder was told not to throw; this only guards the parser itself.
    parsed = false;
  }
  if (!parsed || root.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  if (!root.is_structured()) return root;
  if (CountMembers(root) != sax.names_read()) {
    return absl::InvalidArgumentError("a JSON object has a duplicate member name");
  }
  return root;
}

}  // namespace mandate::jose
