#include "broker/agent/broker_client.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/crypto.h>

#include "absl/strings/str_cat.h"
#include "broker/common/grpcutil/keepalive.h"
#include "broker/common/grpcutil/status.h"
#include "broker/common/util/status_macros.h"
#include "mandate/node/v1/node.grpc.pb.h"

namespace mandate::agent {
namespace {

namespace nodepb = mandate::node::v1;
namespace workloadpb = mandate::workload::v1;
using grpcutil::ToAbslStatus;

constexpr auto kCallTimeout = std::chrono::seconds(15);

// Accepts the broker's certificate only when it names spiffe://<td>/broker. The chain itself
// was already checked against the trust bundle by gRPC (verify_server_certs).
class BrokerIdVerifier final : public grpc::experimental::ExternalCertificateVerifier {
 public:
  explicit BrokerIdVerifier(std::string expected) : expected_(std::move(expected)) {}
  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)>, grpc::Status* sync_status) override {
    auto uris = request->uri_names();
    if (uris.size() == 1 && std::string_view(uris[0].data(), uris[0].size()) == expected_) {
      *sync_status = grpc::Status::OK;
    } else {
      *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                  "broker certificate does not name " + expected_);
    }
    return true;  // Synchronous decision.
  }
  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest*) override {}

 private:
  const std::string expected_;
};

void SetDeadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + kCallTimeout);
}

std::string ChainPem(const std::vector<crypto::Certificate>& chain) {
  std::string out;
  for (const auto& cert : chain) out += cert.Pem();
  return out;
}

}  // namespace

BrokerClient::BrokerClient(std::string address, std::string trust_bundle_pem,
                           spiffe::TrustDomain td)
    : address_(std::move(address)),
      trust_domain_(std::move(td)),
      trust_bundle_pem_(std::move(trust_bundle_pem)) {}

BrokerClient::~BrokerClient() {
  OPENSSL_cleanse(identity_key_pem_.data(), identity_key_pem_.size());
}

std::shared_ptr<grpc::Channel> BrokerClient::MakeChannel(const std::string& key_pem,
                                                         const std::string& chain_pem) {
  using namespace grpc::experimental;
  std::vector<IdentityKeyCertPair> identity;
  if (!key_pem.empty()) identity.push_back({key_pem, chain_pem});
  auto provider = std::make_shared<StaticDataCertificateProvider>(trust_bundle_pem_, identity);
  TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider);
  options.watch_root_certs();
  if (!identity.empty()) options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);
  options.set_check_call_host(false);
  options.set_certificate_verifier(
      ExternalCertificateVerifier::Create<BrokerIdVerifier>(spiffe::BrokerId(trust_domain_).str()));
  grpc::ChannelArguments args;
  // Host-name checks are replaced by the SPIFFE ID check above; the override keeps gRPC's
  // default SNI/host logic from failing on IP addresses or aliases.
  args.SetSslTargetNameOverride("localhost");
  // Matched by the broker's AcceptAgentKeepalive, so the pings never earn a GOAWAY.
  grpcutil::SetAgentKeepalive(args);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 5000);
  return grpc::CreateCustomChannel(address_, TlsCredentials(options), args);
}

std::shared_ptr<grpc::Channel> BrokerClient::Channel() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!channel_) channel_ = MakeChannel(identity_key_pem_, identity_chain_pem_);
  return channel_;
}

absl::Status BrokerClient::SetIdentity(const std::vector<crypto::Certificate>& chain,
                                       const crypto::PrivateKey& key) {
  std::string key_pem = key.ExportPemSecret();
  if (key_pem.empty() || chain.empty()) return absl::InternalError("cannot encode agent identity");
  std::lock_guard<std::mutex> lock(mu_);
  OPENSSL_cleanse(identity_key_pem_.data(), identity_key_pem_.size());
  identity_key_pem_ = std::move(key_pem);
  identity_chain_pem_ = ChainPem(chain);
  channel_ = MakeChannel(identity_key_pem_, identity_chain_pem_);
  return absl::OkStatus();
}

void BrokerClient::SetTrustBundle(std::string trust_bundle_pem) {
  std::lock_guard<std::mutex> lock(mu_);
  if (trust_bundle_pem == trust_bundle_pem_) return;
  trust_bundle_pem_ = std::move(trust_bundle_pem);
  channel_.reset();
}

absl::StatusOr<AttestationOutcome> BrokerClient::Attest(attestors::AgentNodeAttestor& attestor,
                                                        std::string_view csr_der) {
  std::shared_ptr<grpc::Channel> channel;
  {
    // Attestation never presents a client certificate.
    std::lock_guard<std::mutex> lock(mu_);
    channel = MakeChannel("", "");
  }
  auto stub = nodepb::NodeApi::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(context);
  auto stream = stub->Attest(&context);
  ASSIGN_OR_RETURN(crypto::ParsedCsr csr, crypto::ParseAndVerifyCsrDer(csr_der));
  ASSIGN_OR_RETURN(std::string payload, attestor.Payload(csr.key.SpkiDer()));
  nodepb::AttestRequest first;
  first.mutable_params()->set_attestor(std::string(attestor.name()));
  first.mutable_params()->set_payload(payload);
  first.mutable_params()->set_csr(std::string(csr_der));
  if (!stream->Write(first)) return ToAbslStatus(stream->Finish());
  nodepb::AttestResponse response;
  while (stream->Read(&response)) {
    if (response.has_challenge()) {
      ASSIGN_OR_RETURN(std::string answer, attestor.AnswerChallenge(response.challenge()));
      nodepb::AttestRequest reply;
      reply.set_challenge_response(answer);
      if (!stream->Write(reply)) break;
      continue;
    }
    if (response.has_result()) {
      stream->WritesDone();
      grpc::Status final_status = stream->Finish();
      if (!final_status.ok()) return ToAbslStatus(final_status);
      AttestationOutcome out;
      out.spiffe_id = response.result().spiffe_id();
      ASSIGN_OR_RETURN(out.svid_chain,
                       crypto::Certificate::ParseDerChain(response.result().svid_chain()));
      ASSIGN_OR_RETURN(out.bundle, crypto::Certificate::ParseDerChain(response.result().bundle()));
      return out;
    }
  }
  grpc::Status status = stream->Finish();
  if (status.ok()) return absl::InternalError("broker ended attestation without a result");
  return ToAbslStatus(status);
}

absl::StatusOr<std::vector<crypto::Certificate>> BrokerClient::RenewAgentSvid(
    std::string_view csr_der) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  nodepb::RenewAgentSvidRequest request;
  request.set_csr(std::string(csr_der));
  nodepb::RenewAgentSvidResponse response;
  grpc::Status status = stub->RenewAgentSvid(&context, request, &response);
  if (!status.ok()) return ToAbslStatus(status);
  return crypto::Certificate::ParseDerChain(response.svid_chain());
}

absl::StatusOr<std::vector<SignedSvid>> BrokerClient::SignX509Svids(
    const std::vector<std::pair<std::string, std::string>>& entry_csrs) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  nodepb::SignX509SvidsRequest request;
  for (const auto& [entry_id, csr] : entry_csrs) {
    auto* r = request.add_requests();
    r->set_entry_id(entry_id);
    r->set_csr(csr);
  }
  nodepb::SignX509SvidsResponse response;
  grpc::Status status = stub->SignX509Svids(&context, request, &response);
  if (!status.ok()) return ToAbslStatus(status);
  std::vector<SignedSvid> out;
  for (const auto& svid : response.svids()) {
    SignedSvid s;
    s.entry_id = svid.entry_id();
    s.spiffe_id = svid.spiffe_id();
    ASSIGN_OR_RETURN(s.chain, crypto::Certificate::ParseDerChain(svid.svid_chain()));
    out.push_back(std::move(s));
  }
  return out;
}

absl::StatusOr<MintedJwt> BrokerClient::MintJwtSvid(const std::string& entry_id,
                                                    const std::vector<std::string>& audiences) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  nodepb::MintJwtSvidRequest request;
  request.set_entry_id(entry_id);
  for (const auto& aud : audiences) request.add_audience(aud);
  nodepb::MintJwtSvidResponse response;
  grpc::Status status = stub->MintJwtSvid(&context, request, &response);
  if (!status.ok()) return ToAbslStatus(status);
  return MintedJwt{response.spiffe_id(), response.token(), response.expires_at()};
}

absl::Status BrokerClient::DeclareTask(const nodepb::NodeDeclareTaskRequest& request,
                                       workloadpb::Task* response) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  return ToAbslStatus(stub->DeclareTask(&context, request, response));
}

absl::Status BrokerClient::GetTask(const nodepb::NodeGetTaskRequest& request,
                                   workloadpb::Task* response) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  return ToAbslStatus(stub->GetTask(&context, request, response));
}

absl::Status BrokerClient::EndTask(const nodepb::NodeEndTaskRequest& request,
                                   workloadpb::Task* response) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  return ToAbslStatus(stub->EndTask(&context, request, response));
}

absl::Status BrokerClient::FetchTaskToken(const nodepb::NodeFetchTaskTokenRequest& request,
                                          workloadpb::FetchTaskTokenResponse* response,
                                          TaskTokenHints* hints) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  SetDeadline(context);
  grpc::Status status = stub->FetchTaskToken(&context, request, response);
  if (hints != nullptr) {
    const auto& trailers = context.GetServerTrailingMetadata();
    auto read = [&trailers](const char* name) {
      auto it = trailers.find(name);
      return it == trailers.end() ? std::string()
                                  : std::string(it->second.data(), it->second.size());
    };
    hints->dpop_nonce = read("dpop-nonce");
    hints->retry_after = read("retry-after");
  }
  return ToAbslStatus(status);
}

absl::Status BrokerClient::RunSync(
    const std::function<void(const nodepb::SyncResponse&)>& on_snapshot,
    const std::atomic<bool>& stop) {
  auto stub = nodepb::NodeApi::NewStub(Channel());
  grpc::ClientContext context;
  {
    std::lock_guard<std::mutex> lock(mu_);
    sync_context_ = &context;
  }
  auto reader = stub->Sync(&context, nodepb::SyncRequest());
  nodepb::SyncResponse snapshot;
  while (!stop && reader->Read(&snapshot)) on_snapshot(snapshot);
  if (stop) context.TryCancel();
  grpc::Status status = reader->Finish();
  {
    std::lock_guard<std::mutex> lock(mu_);
    sync_context_ = nullptr;
  }
  return ToAbslStatus(status);
}

void BrokerClient::CancelSync() {
  std::lock_guard<std::mutex> lock(mu_);
  if (sync_context_ != nullptr) sync_context_->TryCancel();
}

}  // namespace mandate::agent
