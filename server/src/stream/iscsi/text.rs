//! Text requests of the full feature phase (RFC 7143 §11.10, §11.11): `SendTargets` answered
//! from the images the session's principal may read, and the exchange's state across PDUs.
//!
//! An initiator may split a request over several Text Requests with C set: each part gets an
//! empty Text Response carrying a tag of ours (neither F nor C), the next part echoes it, and
//! the text is answered once whole, within [`pdu::MAX_TEXT`] (more closes the connection). An
//! answer longer than the initiator's MaxRecvDataSegmentLength (SendTargets with many targets)
//! goes out in parts with C set, each when the initiator asks for it with an empty request
//! carrying our tag. A request with the reserved tag starts afresh (§11.10.4).

use std::net::SocketAddr;

use kagami_images::model::ImageStatus;
use uuid::Uuid;

use super::login::{self, Kind, Principal, Session};
use super::pdu::{self, TextFlow};
use super::{MAX_TARGETS, target_id, target_name};
use crate::catalog::images::{self as catalog_images, ListQuery};
use crate::stream::Reader;

/// Where a connection's text exchange stands.
#[derive(Debug, Default)]
pub struct Exchange {
    /// The initiator's request, while it comes in parts.
    gather: pdu::TextGather,
    /// The tag we gave for the exchange in progress (its next part, or the rest of our answer).
    tag: Option<u32>,
    /// Our answer, and how much of it was sent.
    answer: Vec<u8>,
    sent: usize,
}

/// What to do with one Text Request.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The request is whole: answer it (and hand the answer to [`Exchange::answer`]).
    Whole(Vec<u8>),
    /// Send this response (an empty one asking for the next part, or the next part of ours).
    Reply(Reply),
    /// Reject the PDU; with `close`, end the connection too.
    Refused { why: &'static str, close: bool },
}

/// One Text Response's flow and data.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub flow: TextFlow,
    pub data: Vec<u8>,
}

impl Exchange {
    /// One Text Request: its tags, C and F bits and data; `max` is the initiator's
    /// MaxRecvDataSegmentLength.
    pub fn request(
        &mut self,
        itt: u32,
        ttt: u32,
        cont: bool,
        fin: bool,
        data: &[u8],
        max: usize,
    ) -> Step {
        if ttt == pdu::RESERVED_TAG {
            self.reset();
        } else if self.tag != Some(ttt) {
            self.reset();
            return Step::Refused {
                why: "a Text Request with a Target Transfer Tag this target did not give",
                close: false,
            };
        } else if self.sent < self.answer.len() {
            return Step::Reply(self.next_part(max));
        }
        if cont && fin {
            self.reset();
            return Step::Refused {
                why: "a Text Request with both C and F set",
                close: false,
            };
        }
        match self.gather.push(data, cont) {
            Err(_) => {
                self.reset();
                Step::Refused {
                    why: "a Text Request whose text is longer than 65536 bytes",
                    close: true,
                }
            }
            Ok(None) => {
                let tag = tag_for(itt);
                self.tag = Some(tag);
                Step::Reply(Reply {
                    flow: TextFlow::Awaiting(tag),
                    data: Vec::new(),
                })
            }
            Ok(Some(text)) => {
                self.tag = None;
                Step::Whole(text)
            }
        }
    }

    /// The first response to the request of `itt`, answered with `text`: all of it, or its first
    /// `max` bytes with the rest kept for the initiator to ask for.
    pub fn answer(&mut self, itt: u32, text: Vec<u8>, max: usize) -> Reply {
        self.answer = text;
        self.sent = 0;
        self.tag = Some(tag_for(itt));
        self.next_part(max)
    }

    fn next_part(&mut self, max: usize) -> Reply {
        let end = self.answer.len().min(self.sent + max.max(1));
        let data = self.answer[self.sent..end].to_vec();
        self.sent = end;
        if end < self.answer.len() {
            let tag = self.tag.unwrap_or_else(|| tag_for(0));
            return Reply {
                flow: TextFlow::More(tag),
                data,
            };
        }
        self.reset();
        Reply {
            flow: TextFlow::Final,
            data,
        }
    }

    fn reset(&mut self) {
        *self = Exchange::default();
    }
}

/// Our tag for the exchange of request `itt`: any value but the reserved one, which the
/// initiator echoes.
fn tag_for(itt: u32) -> u32 {
    itt & 0x7fff_ffff
}

/// `ADDR:PORT,1`: the portal the initiator reached, as SendTargets names it.
pub fn portal_address(local: SocketAddr) -> String {
    match local {
        SocketAddr::V4(a) => format!("{}:{},1", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{},1", a.ip(), a.port()),
    }
}

/// The answer to a whole text request: `SendTargets` (All in a discovery session; empty or this
/// target's name in a normal one), other keys not understood. `Err` when the request is not
/// text.
pub async fn answer(
    data: &[u8],
    session: &Session,
    portal: &str,
    reader: &Reader,
) -> Result<Vec<u8>, ()> {
    let pairs = pdu::decode_text(data).map_err(|_| ())?;
    let mut out = Vec::new();
    for (key, value) in pairs {
        if key != "SendTargets" {
            pdu::push_key(&mut out, key, "NotUnderstood");
            continue;
        }
        let ids: Vec<Uuid> = match (&session.kind, value) {
            (Kind::Discovery, "All") => readable_images(reader, &session.principal).await,
            (Kind::Discovery, name) => {
                let readable = readable_images(reader, &session.principal).await;
                target_id(name)
                    .filter(|id| readable.contains(id))
                    .into_iter()
                    .collect()
            }
            (Kind::Normal { id, .. }, "") => vec![*id],
            (Kind::Normal { id, .. }, name) => {
                target_id(name).filter(|t| t == id).into_iter().collect()
            }
        };
        for id in ids {
            pdu::push_key(&mut out, "TargetName", &target_name(id));
            pdu::push_key(&mut out, "TargetAddress", portal);
        }
    }
    Ok(out)
}

/// Active images `principal` may read, at most [`MAX_TARGETS`], oldest first: an ISO boot
/// token's own image only.
async fn readable_images(reader: &Reader, principal: &Principal) -> Vec<Uuid> {
    let caller = match principal {
        Principal::Caller(caller) => caller.clone(),
        Principal::BootToken { image, .. } => {
            let (image, who) = (*image, principal.clone());
            let open = reader
                .catalog
                .run(move |c| login::open_for(c, &who, image))
                .await;
            return open.map(|_| vec![image]).unwrap_or_default();
        }
    };
    let listed = reader
        .catalog
        .run(move |c| {
            let mut ids = Vec::new();
            let mut marker = None;
            while ids.len() < MAX_TARGETS {
                let page = catalog_images::list(
                    c,
                    &caller,
                    &ListQuery {
                        status: Some(ImageStatus::Active),
                        limit: Some(catalog_images::MAX_LIMIT),
                        marker: marker.take(),
                        ..ListQuery::default()
                    },
                )?;
                ids.extend(page.images.iter().map(|i| i.id));
                match page.next_marker {
                    Some(next) => marker = Some(next.to_string()),
                    None => break,
                }
            }
            ids.truncate(MAX_TARGETS);
            Ok(ids)
        })
        .await;
    listed.unwrap_or_else(|e| {
        tracing::error!("iSCSI SendTargets: cannot list images: {e}");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16;

    fn reply(flow: TextFlow, data: &[u8]) -> Step {
        Step::Reply(Reply {
            flow,
            data: data.to_vec(),
        })
    }

    #[test]
    fn a_split_request_is_gathered_then_answered() {
        let mut x = Exchange::default();
        let r = pdu::RESERVED_TAG;
        assert_eq!(
            x.request(7, r, true, false, b"SendTar", MAX),
            reply(TextFlow::Awaiting(7), b"")
        );
        assert_eq!(
            x.request(7, 7, true, false, b"gets=", MAX),
            reply(TextFlow::Awaiting(7), b"")
        );
        assert_eq!(
            x.request(7, 7, false, true, b"All\0", MAX),
            Step::Whole(b"SendTargets=All\0".to_vec())
        );
        // A part with a tag we did not give (here: after the exchange ended) is refused.
        assert!(matches!(
            x.request(8, 7, false, true, b"", MAX),
            Step::Refused { close: false, .. }
        ));
        // C and F together are refused; a reserved tag starts afresh.
        x.request(9, r, true, false, b"A=", MAX);
        assert!(matches!(
            x.request(9, 9, true, true, b"1\0", MAX),
            Step::Refused { close: false, .. }
        ));
        assert_eq!(
            x.request(10, r, false, true, b"B=2\0", MAX),
            Step::Whole(b"B=2\0".to_vec())
        );
    }

    #[test]
    fn a_request_past_the_text_budget_closes() {
        let mut x = Exchange::default();
        let part = vec![b'a'; pdu::MAX_TEXT / 2];
        let r = pdu::RESERVED_TAG;
        assert!(matches!(
            x.request(1, r, true, false, &part, MAX),
            Step::Reply(_)
        ));
        assert!(matches!(
            x.request(1, 1, true, false, &part, MAX),
            Step::Reply(_)
        ));
        assert!(matches!(
            x.request(1, 1, false, true, b"x", MAX),
            Step::Refused { close: true, .. }
        ));
    }

    #[test]
    fn a_long_answer_goes_out_in_parts_on_request() {
        let mut x = Exchange::default();
        let text: Vec<u8> = (0..40u8).collect();
        let first = x.answer(0x8000_0005, text.clone(), MAX);
        assert_eq!(first.flow, TextFlow::More(5));
        assert_eq!(first.data, &text[..16]);
        assert_eq!(
            x.request(6, 5, false, true, b"", MAX),
            reply(TextFlow::More(5), &text[16..32])
        );
        assert_eq!(
            x.request(6, 5, false, true, b"", MAX),
            reply(TextFlow::Final, &text[32..])
        );
        // Done: the tag is no longer ours. An answer that fits is one final response.
        assert!(matches!(
            x.request(6, 5, false, true, b"", MAX),
            Step::Refused { .. }
        ));
        let short = x.answer(3, b"A=1\0".to_vec(), MAX);
        assert_eq!(
            short,
            Reply {
                flow: TextFlow::Final,
                data: b"A=1\0".to_vec()
            }
        );
        // A new request in the middle of a long answer drops the rest.
        x.answer(4, text.clone(), MAX);
        assert_eq!(
            x.request(11, pdu::RESERVED_TAG, false, true, b"C=3\0", MAX),
            Step::Whole(b"C=3\0".to_vec())
        );
        assert!(matches!(
            x.request(12, 4, false, true, b"", MAX),
            Step::Refused { .. }
        ));
    }

    #[test]
    fn portals() {
        assert_eq!(
            portal_address("127.0.0.1:3260".parse().expect("addr")),
            "127.0.0.1:3260,1"
        );
        assert_eq!(
            portal_address("[::1]:3260".parse().expect("addr")),
            "[::1]:3260,1"
        );
    }
}
