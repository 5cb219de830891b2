// The keepalive contract between node agents (gRPC clients) and the broker's node API (server).
//
// An agent pings its broker connection every kAgentKeepaliveTimeMs, calls or not, so a dead
// broker or a dropped NAT mapping is noticed within seconds rather than at the next call. A gRPC
// server by default accepts a ping without data in between at most every 5 minutes and, after
// GRPC_ARG_HTTP2_MAX_PING_STRIKES (2) early ones, closes the connection with GOAWAY
// ENHANCE_YOUR_CALM "too_many_pings"; the agent then reconnects and its open Sync stream breaks.
// Both sides take their settings from here so they stay compatible.
//
// Header-only; thread-compatible (the functions only fill argument objects).
#ifndef MANDATE_BROKER_COMMON_GRPCUTIL_KEEPALIVE_H_
#define MANDATE_BROKER_COMMON_GRPCUTIL_KEEPALIVE_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/server_builder.h>

namespace mandate::grpcutil {

inline constexpr int kAgentKeepaliveTimeMs = 30000;
// How long an unanswered ping may take before the agent drops the connection.
inline constexpr int kAgentKeepaliveTimeoutMs = 10000;

// The agent's channel: a ping every `keepalive_time_ms`, even without calls in flight and
// without data in between (gRPC otherwise stops after two pings on an idle Sync stream, which
// would leave a dead connection unnoticed).
inline void SetAgentKeepalive(grpc::ChannelArguments& args,
                              int keepalive_time_ms = kAgentKeepaliveTimeMs) {
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive_time_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, kAgentKeepaliveTimeoutMs);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
}

// The node API server: accepts the agents' pings. A ping earlier than half the agents' interval
// after the previous one is a strike (timer slack never comes close to that), and the
// connection is closed after two strikes in a row, so a client pinging in a loop is still cut
// off. Pings are allowed without calls in flight, like the agent sends them.
inline void AcceptAgentKeepalive(grpc::ServerBuilder& builder,
                                 int agent_keepalive_time_ms = kAgentKeepaliveTimeMs) {
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             agent_keepalive_time_ms / 2);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
}

}  // namespace mandate::grpcutil

#endif  // MANDATE_BROKER_COMMON_GRPCUTIL_KEEPALIVE_H_
