# An example issuance policy for Mandate's webhook hook (docs/policy-hooks.md), served by OPA:
#
#   opa run --server --addr 127.0.0.1:8181 docs/policy-example.rego
#   mandate-broker ... --policy-webhook http://127.0.0.1:8181/v1/data/mandate/issuance
#
# The broker POSTs {"input": <the input document>} to /v1/data/mandate/issuance, and OPA answers
# {"result": <this package's document>}: the rules named allow, reason, ttl_max, scopes and
# require_approval below are the answer's fields. The helper rules (research, payments, fleet,
# token_kinds, requested) are in the document too; the broker ignores members it does not know,
# so keep helpers' names apart from the answer's.
#
# A rule that cannot be evaluated (a conflict between two complete rules, a runtime error) makes
# OPA answer 500, and the broker denies as a hook error - so every value rule below has exactly
# one definition or an else chain.
#
# The fleet:
#   - spiffe://example.org/agent/research: read-only - only read:* scopes are granted (others are
#     narrowed away; a request with none left is denied), tokens live at most 300 s.
#   - spiffe://example.org/agent/payments: every task it declares needs a human's approval
#     (`mandate approval ...`); tokens for an approved task follow.
#   - node agents: their SVIDs are allowed (node attestation already decided who they are).
#   - anything else: denied.
package mandate.issuance

import rego.v1

research := "spiffe://example.org/agent/research"

payments := "spiffe://example.org/agent/payments"

fleet := {research, payments}

# Credentials that carry scopes (and tokens that 300 s applies to).
token_kinds := {"task", "task_token", "token_exchange"}

# The scopes asked for: a declaration carries them in its task, the other kinds in "scopes".
requested := input.task.scopes if {
	input.kind == "task"
} else := input.scopes

# ---------------------------------------------------------------------------- allow

default allow := false

allow if input.kind == "node_svid"

allow if {
	input.kind in {"x509_svid", "jwt_svid"}
	input.spiffe_id in fleet
}

allow if {
	input.spiffe_id == research
	input.kind in token_kinds
	count(scopes) > 0
}

allow if {
	input.spiffe_id == payments
	input.kind in token_kinds
}

# ---------------------------------------------------------------------------- caps

# Read-only for the research agent: the granted scopes are the read:* ones it asked for.
scopes := [s | some s in requested; startswith(s, "read:")] if {
	input.spiffe_id == research
	input.kind in token_kinds
}

ttl_max := 300 if {
	input.spiffe_id == research
	input.kind in {"jwt_svid", "task_token", "token_exchange"}
}

# ---------------------------------------------------------------------------- approval

default require_approval := false

require_approval if {
	input.spiffe_id == payments
	input.kind == "task"
}

# ---------------------------------------------------------------------------- reason

# Shown to the caller on a denial and written to the audit log either way.
reason := "payments agent: tasks need a human's approval" if {
	require_approval
} else := "research agent: read-only scopes, tokens of at most 300 s" if {
	allow
	input.spiffe_id == research
} else := "research agent: only read:* scopes are granted" if {
	input.spiffe_id == research
	not allow
} else := "not part of the example fleet" if {
	not allow
}
