//! The driver's side of the VIP front's director ([`crate::cluster`]'s election): while this
//! member directs, a new site that supports RFC 5685 gets an IKE_SA_INIT answer with
//! N(REDIRECT) to the member [`Spread`] picks by load, and no state is kept for it here.

use std::net::SocketAddr;

use concentrator_esp::encap::NON_ESP_MARKER;
use concentrator_fleet::MemberId;
use concentrator_fleet::director::Spread;
use concentrator_fleet::wire::Kind;
use concentrator_ike::Message;
use concentrator_ike::redirect::{GatewayId, init_redirect_of, init_response};

use super::driver::Driver;
use crate::metrics::ReasonLabel;

/// What the director keeps between redirects.
#[derive(Debug, Default)]
pub(super) struct DriverDirector {
    spread: Spread,
}

impl Driver {
    /// Answers `datagram` (which routing left to us) with a REDIRECT if we direct the VIP
    /// front and it is a new site that can be sent elsewhere: true if it was answered so.
    pub(super) fn direct(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        via: Option<MemberId>,
    ) -> bool {
        let Some(f) = self.fleet.as_mut() else {
            return false;
        };
        if !f.view.vip_front() || f.view.director().is_none_or(|d| Some(d) != f.view.me()) {
            return false;
        }
        let Ok(msg) = Message::decode(datagram) else {
            return false;
        };
        if !init_redirect_of(&msg).is_some_and(|r| r.redirectable()) {
            return false;
        }
        let Some(choice) = f.director.spread.choose(&f.view.members()) else {
            // No member to send it to (none has a redirect address, or all drain): served
            // here rather than refused.
            return false;
        };
        let Some(answer) = init_response(&msg, &GatewayId::Ip(choice.address)) else {
            return false;
        };
        tracing::debug!(%remote, to = %choice.address, member = %choice.member, "new site redirected");
        self.gateway
            .metrics
            .fleet
            .redirects
            .get_or_create(&ReasonLabel {
                reason: "init".into(),
            })
            .inc();
        self.answer_direct(local, remote, via, &answer);
        true
    }

    /// Sends an answer the engine did not make (it keeps no state for a redirected site)
    /// back the way `datagram` came: through the member it entered by, or from our socket.
    fn answer_direct(&mut self, local: SocketAddr, remote: SocketAddr, via: Option<MemberId>, answer: &[u8]) {
        let nat_t = local.port() == self.configs.nat_t_port;
        let mut out = Vec::with_capacity(answer.len() + 4);
        if nat_t {
            // RFC 3948 §2.2: IKE on port 4500 carries the non-ESP marker, on the wire and in
            // a frame alike.
            out.extend_from_slice(&NON_ESP_MARKER);
        }
        out.extend_from_slice(answer);
        if let Some(m) = via {
            let Some(f) = self.fleet.as_mut() else { return };
            match f.view.address(m) {
                Some(to) => {
                    f.link.send(Kind::Egress, to, local, remote, 0, &out);
                }
                None => self.gateway.metrics.fleet.forward.drop("member_gone"),
            }
            return;
        }
        let socket = if nat_t { &self.udp4500 } else { &self.udp500 };
        // UDP does not block for long; a full buffer loses the answer and the site
        // retransmits.
        if let Err(e) = socket.try_send_to(&out, remote) {
            tracing::debug!(%remote, error = %e, "redirect not sent");
        }
    }
}
