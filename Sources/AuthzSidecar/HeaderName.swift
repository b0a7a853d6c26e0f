/// Header names the sidecar derives from configuration.
enum HeaderName {
    /// An RFC 9110 token made of letters, digits, `-`, `_` and `.` (a strict subset that every
    /// proxy passes through).
    static func isValid(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 128 && name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2D || c == 0x5F || c == 0x2E
        }
    }

    /// `X-Credential-<Claim>`: `_` and `.` become `-` (nginx ignores header names with `_`), each
    /// word capitalised: `tenant_id` → `X-Credential-Tenant-Id`.
    static func credential(forClaim claim: String) -> String {
        let words = claim.split(whereSeparator: { $0 == "_" || $0 == "." || $0 == "-" })
        return "X-Credential-" + words.map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined(separator: "-")
    }
}
