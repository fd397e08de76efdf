//! The configuration of an IKE SA, in either role: what it proposes and accepts, its
//! subnets and identity, lifetimes, liveness checks and retransmissions, and the few settings
//! that only one role reads (named so in their docs).

use std::time::Duration;

use concentrator_algorithms::{EspProposal, IkeProposal};
use ipnet::IpNet;

use super::{DEFAULT_CHILD_LIFETIME, IdBuf, Retransmit};
use crate::redirect::GatewayId;

/// When the initiator moves to the NAT traversal ports (RFC 7296 §2.23).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTraversal {
    /// Float after IKE_SA_INIT even without a NAT. RFC 7296 §2.23: "An initiator can use port
    /// 4500 for both IKE and ESP, regardless of whether or not there is a NAT".
    pub force: bool,
    /// Our port after the float (the caller's second socket).
    pub local_port: u16,
    /// The peer's port after the float.
    pub remote_port: u16,
}

impl Default for NatTraversal {
    /// Float only when a NAT is detected, from and to port 4500.
    fn default() -> Self {
        Self {
            force: false,
            local_port: 4500,
            remote_port: 4500,
        }
    }
}

/// What an IKE SA proposes, accepts and expects, in either role.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our IKE SA proposals, in order of preference: offered as initiator, accepted as
    /// responder.
    pub ike_proposals: Vec<IkeProposal>,
    /// Our ESP proposals (their DH groups are the PFS groups of CREATE_CHILD_SA).
    pub esp_proposals: Vec<EspProposal>,
    /// Our side of the tunnel: our traffic selector is narrowed to it.
    pub local_subnet: IpNet,
    /// The peer's side: its traffic selector is narrowed to it.
    pub remote_subnet: IpNet,
    /// Our identity (IDi as initiator, IDr as responder).
    pub local_id: IdBuf,
    /// Initiator: the peer's identity, sent as IDr and required in its response; `None`
    /// accepts any. (A responder learns the peer's from IKE_AUTH.)
    pub remote_id: Option<IdBuf>,
    /// Lifetime of a CHILD SA, reported with each one installed; this side rekeys it at 85 %
    /// to 95 % of it (zero: never).
    pub child_lifetime: Duration,
    /// Lifetime of the IKE SA: this side rekeys it at 85 % to 95 % of it (RFC 7296 §1.3.2,
    /// §2.8); `None` leaves IKE SA rekeys to the peer.
    pub ike_lifetime: Option<Duration>,
    /// Initiator: carry on as the new IKE SA when the peer rekeys it (RFC 7296 §1.3.2). Off by
    /// default: the peer's IKE SA rekeys are then declined with NO_ADDITIONAL_SAS (§1.3),
    /// because [`crate::endpoint::Endpoint`] routes an SA it initiated by its first SPIi and
    /// the Initiator flag, which a rekey by the peer changes (§3.1). The same holds for our
    /// own rekeys: leave [`Config::ike_lifetime`] `None` behind an endpoint. A responder always
    /// follows the peer's IKE SA rekeys.
    pub accept_ike_rekey: bool,
    /// Initiator: announce support for redirects (RFC 5685 §3: N(REDIRECT_SUPPORTED) in
    /// IKE_SA_INIT) and follow them: a REDIRECT in the IKE_SA_INIT or IKE_AUTH response, or in
    /// an INFORMATIONAL request on the established SA, closes this SA and names the new
    /// gateway ([`crate::Initiator::redirected_to`]); the caller connects there with
    /// [`Config::redirected_from`].
    pub redirect_supported: bool,
    /// Initiator: the gateway that redirected us here, sent as N(REDIRECTED_FROM) in
    /// IKE_SA_INIT instead of N(REDIRECT_SUPPORTED) (RFC 5685 §4.1).
    pub redirected_from: Option<GatewayId>,
    /// Liveness checks (RFC 7296 §2.4): after this long without an authenticated message from
    /// the peer an empty INFORMATIONAL request is sent; `None` sends none.
    pub dpd_interval: Option<Duration>,
    /// Responder: how long after the IKE_SA_INIT response IKE_AUTH (PSK lookup included) may
    /// take.
    pub half_open_timeout: Duration,
    /// Retransmission of our requests.
    pub retransmit: Retransmit,
    /// Initiator: when to move to the NAT traversal ports.
    pub nat_t: NatTraversal,
    /// Initiator: IKE_SA_INIT retries on N(COOKIE) and INVALID_KE_PAYLOAD together, so that a
    /// responder alternating them cannot keep us busy forever.
    pub max_init_retries: u32,
    /// Responder: answer NAT detection as if we were behind a NAT (a NAT_DETECTION_SOURCE_IP
    /// hash that cannot match, as strongSwan's `encap = yes` does), so that an initiator
    /// without a NAT in the path still floats to port 4500 and sends ESP in UDP: for a data
    /// plane that carries nothing else (RFC 3948 only, e.g. behind a Kubernetes Service).
    pub force_udp_encap: bool,
    /// Announce RFC 6311 Message ID synchronization in IKE_AUTH (initiator: in the request;
    /// responder: in the response, when the initiator announced it) and use it: an SA
    /// restored from a copy asks the peer for its counters, and the peer's sync request is
    /// answered.
    pub message_id_sync: bool,
    /// After a restore from a copy, ask the peer for its Message ID counters (RFC 6311 §4.2)
    /// when both ends announced it and the IKE SA uses AES-CBC (see
    /// [`crate::sa::mid_sync`]). Off by default: strongSwan 5.9 answers by resetting its task
    /// queue, which leaves a request it had in flight unsent until it queues another task;
    /// the restored SA's catch-up window takes the peer's requests without it.
    pub sync_after_restore: bool,
}

impl Config {
    /// Default of [`Config::half_open_timeout`].
    pub const DEFAULT_HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default of [`Config::child_lifetime`] (the eroute default).
    pub const DEFAULT_CHILD_LIFETIME: Duration = DEFAULT_CHILD_LIFETIME;
    /// Default of [`Config::max_init_retries`].
    pub const DEFAULT_MAX_INIT_RETRIES: u32 = 5;

    /// A configuration with the given proposals, subnets and identity, and defaults for the
    /// rest: any peer identity, CHILD SA lifetime [`Self::DEFAULT_CHILD_LIFETIME`], no IKE SA
    /// rekeys of ours, no liveness checks, [`Self::DEFAULT_HALF_OPEN_TIMEOUT`],
    /// [`Retransmit::default`], redirects announced and followed, float on NAT only,
    /// [`Self::DEFAULT_MAX_INIT_RETRIES`], no forced UDP encapsulation, RFC 6311 announced.
    pub fn new(
        ike_proposals: Vec<IkeProposal>,
        esp_proposals: Vec<EspProposal>,
        local_subnet: IpNet,
        remote_subnet: IpNet,
        local_id: IdBuf,
    ) -> Self {
        Self {
            ike_proposals,
            esp_proposals,
            local_subnet,
            remote_subnet,
            local_id,
            remote_id: None,
            child_lifetime: Self::DEFAULT_CHILD_LIFETIME,
            ike_lifetime: None,
            accept_ike_rekey: false,
            redirect_supported: true,
            redirected_from: None,
            dpd_interval: None,
            half_open_timeout: Self::DEFAULT_HALF_OPEN_TIMEOUT,
            retransmit: Retransmit::default(),
            nat_t: NatTraversal::default(),
            max_init_retries: Self::DEFAULT_MAX_INIT_RETRIES,
            force_udp_encap: false,
            message_id_sync: true,
            sync_after_restore: false,
        }
    }

    /// This configuration with [`Self::force_udp_encap`] set to `force`.
    #[must_use]
    pub fn forcing_udp_encap(self, force: bool) -> Self {
        Self {
            force_udp_encap: force,
            ..self
        }
    }
}
