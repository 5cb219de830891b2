// The one conversion of a registration entry to its wire form (mandate.common.v1.Entry), shared
// by the admin API and the node API's Sync stream.
#ifndef MANDATE_BROKER_SERVER_ENTRY_PROTO_H_
#define MANDATE_BROKER_SERVER_ENTRY_PROTO_H_

#include "broker/common/store/store.h"
#include "mandate/common/v1/types.pb.h"

namespace mandate::broker {

inline void EntryToProto(const store::RegistrationEntry& entry, mandate::common::v1::Entry* out) {
  out->set_id(entry.id);
  out->set_spiffe_id(entry.spiffe_id);
  out->set_parent_id(entry.parent_id);
  for (const auto& s : entry.selectors) out->add_selectors(s);
  for (const auto& s : entry.scopes) out->add_scopes(s);
  out->set_x509_ttl_seconds(entry.x509_ttl_s);
  out->set_jwt_ttl_seconds(entry.jwt_ttl_s);
  out->set_token_ttl_seconds(entry.token_ttl_s);
  out->set_created_at(entry.created_at);
  out->set_revision(entry.revision);
}

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_ENTRY_PROTO_H_
