//! The label sets of the metrics: bounded values only (config names, fixed sets). Every
//! fixed set is a fieldless enum here, with `ALL` and `as_str` (the label value): the
//! callers map their own types onto these, and the zero series are made from `ALL`, so a
//! value cannot be forgotten (`tests::every_label_value_has_its_series`).

use prometheus_client::encoding::EncodeLabelSet;

/// A fieldless enum of label values with `ALL` and `as_str`.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) enum $name {
            $($variant),+
        }

        impl $name {
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];

            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }
    };
}

label_values!(
    /// How a session ended: the log line's `outcome`, the `outcome` label.
    OutcomeKind {
        Relayed => "relayed",
        ClientClosed => "client_closed",
        HandshakeFailed => "handshake_failed",
        Timeout => "timeout",
        UpstreamFailed => "upstream_failed",
        Reset => "reset",
        Limit => "limit",
        Denied => "denied",
        Shutdown => "shutdown",
        ProtocolError => "protocol_error",
        MtaSts => "mta_sts",
        AcmeChallenge => "acme_challenge",
    }
);

label_values!(
    /// How a session that reached the upstream got there.
    TransportKind {
        Implicit => "implicit",
        Starttls => "starttls",
        Plaintext => "plaintext",
        Https => "https",
    }
);

label_values!(
    /// Why a server handshake failed (the `reason` of `result="failed"`).
    HandshakeReason {
        Timeout => "timeout",
        UnrecognizedName => "unrecognized_name",
        InvalidMessage => "invalid_message",
        Incompatible => "incompatible",
        AlertReceived => "alert_received",
        ClientCertificate => "client_certificate",
        TlsError => "tls_error",
        Eof => "eof",
        IoError => "io_error",
    }
);

label_values!(
    /// The verdict on a presented client certificate.
    ClientCertVerify {
        Ok => "ok",
        NoCa => "no_ca",
        Failed => "failed",
    }
);

label_values!(
    /// Why connecting the upstream failed.
    UpstreamFailure {
        Resolve => "resolve",
        Connect => "connect",
        Timeout => "timeout",
        Tls => "tls",
        Greeting => "greeting",
        Refused => "refused",
    }
);

label_values!(
    /// How a reload ended.
    ReloadResult {
        Ok => "ok",
        Failed => "failed",
    }
);

label_values!(
    /// What the smuggling guard did to a session's DATA.
    GuardAction {
        Normalized => "normalized",
        Rejected => "rejected",
    }
);

label_values!(
    /// What an `https` listener answered (MTA-STS policy fetches).
    MtaStsResult {
        Served => "served",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
        Misdirected => "misdirected",
    }
);

label_values!(
    /// What happened to an ACME entry.
    AcmeEvent {
        Ordered => "ordered",
        Issued => "issued",
        Deployed => "deployed",
        DeployedCached => "deployed_cached",
        Loaded => "loaded",
        Failed => "failed",
        StoreError => "store_error",
    }
);

label_values!(
    /// What the follower answered itself after the hand-off (never relayed).
    FollowerRefusal {
        Starttls => "starttls",
        Auth => "auth",
        ProxyExtension => "xclient_xforward",
        BadCharacter => "bad_character",
        BdatSyntax => "bdat_syntax",
        LineTooLong => "line_too_long",
    }
);

label_values!(
    /// Which way relayed bytes went.
    Direction {
        FromClient => "from_client",
        FromUpstream => "from_upstream",
    }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub listener: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    pub listener: String,
    pub result: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClientCertLabels {
    pub listener: String,
    pub mode: String,
    pub verify: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TransportLabels {
    pub listener: String,
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GuardLabels {
    pub listener: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub listener: String,
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub listener: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamFailureLabels {
    pub upstream: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CertLabels {
    pub certificate: String,
    pub origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AcmeLabels {
    pub domains: String,
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TlsSessionLabels {
    pub listener: String,
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// IANA suite name from the provider's fixed list (`tls::provider`).
    pub cipher: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MtaStsLabels {
    /// A configured policy domain; "" when the host was none of them.
    pub domain: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DomainsLabel {
    pub domains: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NameLabel {
    pub(crate) name: String,
}
