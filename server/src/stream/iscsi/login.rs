//! The login phase (RFC 7143 §6.3): security stage (AuthMethod None or CHAP), operational
//! stage (text keys, [`keys`]), then full feature phase — for a discovery session or a normal
//! session on one image's target, which the authenticated principal must be allowed to read:
//! a token's caller (its project and role), or one ISO boot of a host (its image only).
//!
//! An initiator may split a request's text over several Login Requests with C set (§11.12.2):
//! each such PDU gets an empty Login Response (neither T nor C), and the text is negotiated
//! once whole, within [`pdu::MAX_TEXT`] (more is refused as an initiator error). Our own
//! answers are a few hundred bytes, always within the 8192 bytes every initiator receives
//! during login, so they are never split.

use std::sync::Arc;

use kagami_images::Manifest;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

use super::keys::{self, Params};
use super::pdu::{self, LoginRequest};
use super::{CMD_WINDOW, Pdu, chap, read_pdu, target_id};
use crate::catalog::iso;
use crate::catalog::tenancy::{self, Caller};
use crate::stream::{Reader, open_image};

/// What kind of session was logged in.
#[derive(Debug)]
pub enum Kind {
    /// SendTargets only.
    Discovery,
    /// One image's target, LUN 0.
    Normal { id: Uuid, manifest: Arc<Manifest> },
}

/// Who logged in.
#[derive(Clone, Debug)]
pub enum Principal {
    /// A bearer token's project and role (CHAP), or the anonymous caller (no authentication).
    Caller(Caller),
    /// The per-boot token of a host's ISO boot (`kagami host boot-iso --via iscsi`): it opens
    /// and lists `image` only, while the token (its `hash` in `agent_tokens`) lives.
    BootToken {
        host: Uuid,
        image: Uuid,
        hash: Vec<u8>,
    },
}

/// A session at the start of its full feature phase.
#[derive(Debug)]
pub struct Session {
    pub kind: Kind,
    pub principal: Principal,
    pub initiator: String,
    pub params: Params,
    /// The StatSN of the next response.
    pub stat_sn: u32,
    /// The CmdSN of the first command (the login's own).
    pub exp_cmd_sn: u32,
}

/// Where the security stage stands.
#[derive(Debug)]
enum Auth {
    /// Nothing offered yet: a login that skips the stage is a login without authentication.
    NotOffered,
    /// AuthMethod=None chosen: the anonymous caller.
    None,
    /// AuthMethod=CHAP chosen; the initiator's CHAP_A is next.
    ChapChosen,
    /// The challenge was sent; CHAP_N and CHAP_R are next.
    Challenged {
        id: u8,
        challenge: [u8; chap::CHALLENGE_LEN],
    },
    /// CHAP verified for this principal.
    Done(Principal),
}

/// Why a login failed, as the status the initiator gets (and a line for the log).
#[derive(Debug)]
struct Failure {
    status: u16,
    why: String,
}

fn fail(status: u16, why: impl Into<String>) -> Failure {
    Failure {
        status,
        why: why.into(),
    }
}

/// Runs the login phase on a new connection. `Ok(None)`: the initiator was refused (the
/// refusal was sent) or went away.
pub async fn login<R, W>(
    rd: &mut R,
    wr: &mut W,
    reader: &Reader,
    tsih: u16,
) -> std::io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut state = State::new();
    let mut stat_sn: Option<u32> = None;
    let mut text = pdu::TextGather::default();
    loop {
        let Some(Pdu { header, data }) = read_pdu(rd).await? else {
            return Ok(None);
        };
        if header.opcode != pdu::OP_LOGIN {
            // Nothing but login PDUs before the full feature phase (§6.3): close.
            return Ok(None);
        }
        let req = pdu::login_request(&header);
        let sn = *stat_sn.get_or_insert(req.exp_stat_sn);
        let step = match state.gather(&req, &data, &mut text) {
            Ok(Some(whole)) => state.step(&req, &whole, reader).await,
            // Part of a split text: an empty response asks for the rest.
            Ok(None) => Ok(Step {
                keys: Vec::new(),
                transit: false,
                nsg: 0,
                done: None,
            }),
            Err(f) => Err(f),
        };
        let (keys, transit, nsg, status, done) = match step {
            Ok(Step {
                keys,
                transit,
                nsg,
                done,
            }) => (keys, transit, nsg, pdu::LOGIN_SUCCESS, done),
            Err(f) => {
                tracing::info!(
                    initiator = state.initiator.as_deref().unwrap_or("?"),
                    status = format!("{:#06x}", f.status),
                    "iSCSI login refused: {}",
                    f.why
                );
                (Vec::new(), false, 0, f.status, None)
            }
        };
        let final_tsih = if done.is_some() { tsih } else { 0 };
        let mut bhs = pdu::login_response(&req, transit, nsg, final_tsih, status, keys.len());
        pdu::set_numbers(
            &mut bhs,
            sn,
            req.cmd_sn,
            req.cmd_sn.wrapping_add(CMD_WINDOW - 1),
        );
        wr.write_all(&bhs).await?;
        wr.write_all(&keys).await?;
        wr.write_all(&[0u8; 3][..pdu::padded(keys.len()) - keys.len()])
            .await?;
        wr.flush().await?;
        stat_sn = Some(sn.wrapping_add(1));
        if status != pdu::LOGIN_SUCCESS {
            return Ok(None);
        }
        if let Some((kind, principal)) = done {
            return Ok(Some(Session {
                kind,
                principal,
                initiator: state.initiator.unwrap_or_default(),
                params: state.params,
                stat_sn: sn.wrapping_add(1),
                exp_cmd_sn: req.cmd_sn,
            }));
        }
    }
}

/// What one login response says.
struct Step {
    keys: Vec<u8>,
    transit: bool,
    nsg: u8,
    /// Set when this response ends the login (T and NSG = full feature).
    done: Option<(Kind, Principal)>,
}

struct State {
    auth: Auth,
    /// The current stage, once the first request named it.
    stage: Option<u8>,
    initiator: Option<String>,
    target: Option<String>,
    discovery: Option<bool>,
    params: Params,
    /// Our MaxRecvDataSegmentLength was declared.
    declared: bool,
}

impl State {
    fn new() -> State {
        State {
            auth: Auth::NotOffered,
            stage: None,
            initiator: None,
            target: None,
            discovery: None,
            params: Params::default(),
            declared: false,
        }
    }

    /// Checks one Login Request's framing and adds its data to the text being gathered: the
    /// whole text once a request without C arrives, `None` while more is to come.
    fn gather(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        text: &mut pdu::TextGather,
    ) -> Result<Option<Vec<u8>>, Failure> {
        if self.stage.is_none() {
            if req.version_min != 0 {
                return Err(fail(
                    pdu::LOGIN_UNSUPPORTED_VERSION,
                    "only version 0 exists",
                ));
            }
            // A TSIH names a session to add a connection to or reinstate: none here has more
            // than one connection, and none outlives its connection.
            if req.tsih != 0 {
                return Err(fail(pdu::LOGIN_NO_SESSION, "no session to join"));
            }
        }
        if req.cont && req.transit {
            // §11.12.2: a request whose text goes on cannot also ask to move on.
            return Err(fail(
                pdu::LOGIN_INITIATOR_ERROR,
                "a Login Request with both C and T set",
            ));
        }
        let csg = req.csg;
        if csg != pdu::STAGE_SECURITY && csg != pdu::STAGE_OPERATIONAL {
            return Err(fail(pdu::LOGIN_INITIATOR_ERROR, "no such login stage"));
        }
        if self.stage.is_some_and(|s| s != csg) {
            return Err(fail(pdu::LOGIN_INITIATOR_ERROR, "stage out of step"));
        }
        self.stage = Some(csg);
        text.push(data, req.cont)
            .map_err(|e| fail(pdu::LOGIN_INITIATOR_ERROR, e.to_string()))
    }

    /// Negotiates one request's whole text (checked by [`State::gather`]).
    async fn step(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        reader: &Reader,
    ) -> Result<Step, Failure> {
        // The first whole text: it must name the initiator, so no later one finds it unset.
        let first = self.initiator.is_none();
        let csg = req.csg;
        let pairs =
            pdu::decode_text(data).map_err(|e| fail(pdu::LOGIN_INITIATOR_ERROR, e.to_string()))?;
        if csg == pdu::STAGE_OPERATIONAL {
            match self.auth {
                Auth::NotOffered => self.auth = Auth::None,
                Auth::None | Auth::Done(_) => {}
                // Leaving the security stage half-way through CHAP is not logging in.
                _ => return Err(fail(pdu::LOGIN_AUTH_FAILED, "CHAP was not completed")),
            }
        }
        let mut out = Vec::new();
        let mut chap_name = None;
        let mut chap_response = None;
        for (key, value) in &pairs {
            match *key {
                "InitiatorName" => self.initiator = Some(value.to_string()),
                "TargetName" => self.target = Some(value.to_lowercase()),
                "SessionType" => match *value {
                    "Discovery" => self.discovery = Some(true),
                    "Normal" => self.discovery = Some(false),
                    _ => {
                        return Err(fail(
                            pdu::LOGIN_UNSUPPORTED_SESSION_TYPE,
                            "SessionType is Discovery or Normal",
                        ));
                    }
                },
                "AuthMethod" if csg == pdu::STAGE_SECURITY => {
                    // The first of the initiator's choices we support (§6.2.1).
                    let chosen = value.split(',').find(|m| matches!(*m, "CHAP" | "None"));
                    match chosen {
                        Some("CHAP") => self.auth = Auth::ChapChosen,
                        Some(_) => self.auth = Auth::None,
                        None => {
                            return Err(fail(
                                pdu::LOGIN_AUTH_FAILED,
                                "AuthMethod offers neither CHAP nor None",
                            ));
                        }
                    }
                    pdu::push_key(&mut out, key, chosen.unwrap_or("Reject"));
                }
                "CHAP_A" if matches!(self.auth, Auth::ChapChosen) => {
                    if !value.split(',').any(|a| a == chap::ALGORITHM_MD5) {
                        return Err(fail(pdu::LOGIN_AUTH_FAILED, "CHAP_A offers no MD5 (5)"));
                    }
                    let (id, challenge) = chap::challenge()
                        .map_err(|e| fail(pdu::LOGIN_TARGET_ERROR, e.to_string()))?;
                    pdu::push_key(&mut out, "CHAP_A", chap::ALGORITHM_MD5);
                    pdu::push_key(&mut out, "CHAP_I", &id.to_string());
                    pdu::push_key(&mut out, "CHAP_C", &chap::encode(&challenge));
                    self.auth = Auth::Challenged { id, challenge };
                }
                "CHAP_N" => chap_name = Some(value.to_string()),
                "CHAP_R" => chap_response = Some(value.to_string()),
                // The initiator asks us to prove ourselves too (mutual CHAP): there is no
                // target secret to prove it with.
                "CHAP_I" | "CHAP_C" => {
                    return Err(fail(pdu::LOGIN_AUTH_FAILED, "mutual CHAP is not supported"));
                }
                "InitiatorAlias" => {}
                _ => {
                    let discovery = self.discovery.unwrap_or(false);
                    if let Some(answer) = keys::answer(key, value, discovery, &mut self.params) {
                        pdu::push_key(&mut out, key, &answer);
                    }
                }
            }
        }
        if first {
            if self.initiator.is_none() {
                return Err(fail(pdu::LOGIN_MISSING_PARAMETER, "no InitiatorName"));
            }
            if self.discovery == Some(true) {
                self.target = None;
            } else if self.target.is_none() {
                return Err(fail(pdu::LOGIN_MISSING_PARAMETER, "no TargetName"));
            } else {
                // §13.9: a normal session's first login response names the portal group.
                pdu::push_key(&mut out, "TargetPortalGroupTag", "1");
            }
        }
        if let (Some(name), Some(response)) = (chap_name, chap_response) {
            let Auth::Challenged { id, challenge } = self.auth else {
                return Err(fail(pdu::LOGIN_AUTH_FAILED, "CHAP_R before a challenge"));
            };
            let principal = check_chap(reader, &name, &response, id, challenge).await?;
            self.auth = Auth::Done(principal);
        }
        if csg == pdu::STAGE_OPERATIONAL && !self.declared {
            pdu::push_key(
                &mut out,
                "MaxRecvDataSegmentLength",
                &keys::OUR_MAX_RECV.to_string(),
            );
            self.declared = true;
        }
        // The initiator asks to move on; we agree once authentication is done.
        let authenticated = matches!(self.auth, Auth::NotOffered | Auth::None | Auth::Done(_));
        let nsg = req.nsg;
        let transit = req.transit
            && authenticated
            && nsg > csg
            && (nsg == pdu::STAGE_OPERATIONAL || nsg == pdu::STAGE_FULL_FEATURE);
        if transit {
            self.stage = Some(nsg);
        }
        let mut done = None;
        if transit && nsg == pdu::STAGE_FULL_FEATURE {
            let principal = match &self.auth {
                Auth::Done(principal) => principal.clone(),
                _ => Principal::Caller(Caller::anonymous()),
            };
            let kind = match &self.target {
                None => Kind::Discovery,
                Some(name) => authorize(reader, &principal, name).await?,
            };
            done = Some((kind, principal));
        }
        Ok(Step {
            keys: out,
            transit,
            nsg: if transit { nsg } else { 0 },
            done,
        })
    }
}

/// Finds the token a CHAP name stands for — a bearer token or a live ISO boot token — and
/// checks the response against its secret.
async fn check_chap(
    reader: &Reader,
    name: &str,
    response: &str,
    id: u8,
    challenge: [u8; chap::CHALLENGE_LEN],
) -> Result<Principal, Failure> {
    let refused = || {
        fail(
            pdu::LOGIN_AUTH_FAILED,
            "CHAP name or response does not match a token (see `kagami image export-iscsi`)",
        )
    };
    let prefix = chap::hash_prefix(name).ok_or_else(refused)?;
    let got = chap::decode(response).ok_or_else(refused)?;
    let candidates = reader
        .catalog
        .run(move |c| {
            let tokens = tenancy::by_hash_prefix(c, &prefix)?
                .into_iter()
                .map(|(caller, hash)| (Principal::Caller(caller), hash));
            let boots = iso::by_hash_prefix(c, &prefix)?
                .into_iter()
                .map(|(boot, hash)| {
                    let principal = Principal::BootToken {
                        host: boot.host_id,
                        image: boot.image,
                        hash: hash.clone(),
                    };
                    (principal, hash)
                });
            Ok::<_, crate::error::ApiError>(tokens.chain(boots).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| fail(pdu::LOGIN_TARGET_ERROR, e.to_string()))?;
    candidates
        .into_iter()
        .find(|(_, hash)| {
            let (_, secret) = chap::credentials_for_hash(hash);
            chap::verify(id, secret.as_bytes(), &challenge, &got)
        })
        .map(|(principal, _)| principal)
        .ok_or_else(refused)
}

/// The manifest of image `id` if `principal` may read it (active): a caller by the catalog's
/// tenancy rules, an ISO boot token its own image only, while the token lives.
pub fn open_for(
    conn: &rusqlite::Connection,
    principal: &Principal,
    id: Uuid,
) -> Result<Arc<Manifest>, crate::error::ApiError> {
    match principal {
        Principal::Caller(caller) => open_image(conn, caller, id),
        Principal::BootToken { image, hash, .. } => {
            if *image != id || !iso::alive(conn, hash)? {
                return Err(crate::error::ApiError::image_not_found(id));
            }
            open_image(conn, &Caller::system(), id)
        }
    }
}

/// The image behind target `name`, if `principal` may read it. A malformed name, a missing
/// image and one the principal may not read are the same answer: not found.
async fn authorize(reader: &Reader, principal: &Principal, name: &str) -> Result<Kind, Failure> {
    let not_found = |why: String| fail(pdu::LOGIN_NOT_FOUND, why);
    let id = target_id(name)
        .ok_or_else(|| not_found(format!("{name} is not one of this server's targets")))?;
    let who = principal.clone();
    match reader.catalog.run(move |c| open_for(c, &who, id)).await {
        Ok(manifest) => Ok(Kind::Normal { id, manifest }),
        Err(e) => Err(not_found(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(csg: u8, cont: bool, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            cont,
            csg,
            nsg: if transit { pdu::STAGE_FULL_FEATURE } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        }
    }

    fn status(r: Result<Option<Vec<u8>>, Failure>) -> u16 {
        r.expect_err("refused").status
    }

    #[test]
    fn split_login_text_is_gathered_until_a_request_without_c() {
        let mut state = State::new();
        let mut text = pdu::TextGather::default();
        let op = pdu::STAGE_OPERATIONAL;
        let got = state.gather(&request(op, true, false), b"InitiatorName=iq", &mut text);
        assert_eq!(got.ok(), Some(None), "more to come");
        let got = state.gather(&request(op, true, false), b"n.x\0SessionType=", &mut text);
        assert_eq!(got.ok(), Some(None));
        let got = state.gather(&request(op, false, true), b"Discovery\0", &mut text);
        assert_eq!(
            got.ok(),
            Some(Some(
                b"InitiatorName=iqn.x\0SessionType=Discovery\0".to_vec()
            ))
        );
    }

    #[test]
    fn split_login_text_is_refused_when_malformed_or_too_long() {
        let op = pdu::STAGE_OPERATIONAL;
        // C with T: an initiator error.
        let mut text = pdu::TextGather::default();
        let got = State::new().gather(&request(op, true, true), b"A=1\0", &mut text);
        assert_eq!(status(got), pdu::LOGIN_INITIATOR_ERROR);
        // A continuation in another stage.
        let mut state = State::new();
        let mut text = pdu::TextGather::default();
        assert!(
            state
                .gather(&request(op, true, false), b"A=", &mut text)
                .is_ok()
        );
        let got = state.gather(
            &request(pdu::STAGE_SECURITY, false, false),
            b"1\0",
            &mut text,
        );
        assert_eq!(status(got), pdu::LOGIN_INITIATOR_ERROR);
        // Past the text budget.
        let mut state = State::new();
        let mut text = pdu::TextGather::default();
        let part = vec![b'a'; pdu::MAX_TEXT / 2];
        assert!(
            state
                .gather(&request(op, true, false), &part, &mut text)
                .is_ok()
        );
        assert!(
            state
                .gather(&request(op, true, false), &part, &mut text)
                .is_ok()
        );
        let got = state.gather(&request(op, true, false), b"b", &mut text);
        assert_eq!(status(got), pdu::LOGIN_INITIATOR_ERROR);
        // The first request's version and TSIH are checked on its first PDU.
        let mut text = pdu::TextGather::default();
        let mut old = request(op, true, false);
        old.version_min = 1;
        let got = State::new().gather(&old, b"A=", &mut text);
        assert_eq!(status(got), pdu::LOGIN_UNSUPPORTED_VERSION);
    }
}
