//! Operational text keys (RFC 7143 §13): what this target answers to each key an initiator
//! offers, and the values that then apply. A pure function per key; std-only (fuzzed with the
//! codec).

/// Our MaxRecvDataSegmentLength, declared to the initiator: the largest data segment we take
/// (text and login PDUs, and immediate data we drop).
pub const OUR_MAX_RECV: u32 = 65536;
/// The largest MaxBurstLength we accept (the protocol's own maximum, 2^24 - 1): a read is sent
/// in sequences of at most this many bytes.
pub const OUR_MAX_BURST: u32 = (1 << 24) - 1;
/// FirstBurstLength: unsolicited write data, which we only drop.
pub const OUR_FIRST_BURST: u32 = 65536;

/// What the negotiation settled (the defaults of §13 until a key changes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// The initiator's MaxRecvDataSegmentLength: the most data one Data-In or text response
    /// PDU may carry to it.
    pub max_send: u32,
    /// MaxBurstLength: the most data in one Data-In sequence (F set at its end).
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            max_send: 8192,
            max_burst: 262_144,
            first_burst: 65536,
            immediate_data: true,
        }
    }
}

/// Keys that mean nothing in a discovery session (§13: "Irrelevant when SessionType=Discovery").
const NOT_FOR_DISCOVERY: &[&str] = &[
    "MaxBurstLength",
    "FirstBurstLength",
    "ImmediateData",
    "InitialR2T",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
];

/// The answer to operational key `key=value` (`None`: a declaration, which is not answered),
/// updating `params`. Unknown keys are `NotUnderstood` (§6.2), values out of range `Reject`.
pub fn answer(key: &str, value: &str, discovery: bool, params: &mut Params) -> Option<String> {
    if discovery && NOT_FOR_DISCOVERY.contains(&key) {
        return Some("Irrelevant".into());
    }
    let reject = || Some("Reject".to_string());
    let yes_no = |v: &str| match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    };
    match key {
        // Digests cost CPU for nothing on TCP's own checksums: None only.
        "HeaderDigest" | "DataDigest" => Some(if value.split(',').any(|v| v == "None") {
            "None".into()
        } else {
            "Reject".into()
        }),
        "MaxRecvDataSegmentLength" => {
            match number(value).filter(|n| (512..=OUR_MAX_BURST).contains(n)) {
                Some(n) => {
                    params.max_send = n;
                    None
                }
                None => reject(),
            }
        }
        "MaxBurstLength" => match number(value).filter(|n| (512..=OUR_MAX_BURST).contains(n)) {
            Some(n) => {
                params.max_burst = n;
                Some(n.to_string())
            }
            None => reject(),
        },
        "FirstBurstLength" => match number(value).filter(|n| (512..=OUR_MAX_BURST).contains(n)) {
            Some(n) => {
                params.first_burst = n.min(OUR_FIRST_BURST);
                Some(params.first_burst.to_string())
            }
            None => reject(),
        },
        // AND: whatever the initiator says (a write's immediate data is read and dropped).
        "ImmediateData" => match yes_no(value) {
            Some(v) => {
                params.immediate_data = v;
                Some(value.into())
            }
            None => reject(),
        },
        // OR functions where we say Yes: no unsolicited data, everything in order.
        "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no(value) {
            Some(_) => Some("Yes".into()),
            None => reject(),
        },
        // One connection per session, one R2T (never sent: no writes), no error recovery.
        "MaxConnections" | "MaxOutstandingR2T" => match number(value).filter(|&n| n >= 1) {
            Some(_) => Some("1".into()),
            None => reject(),
        },
        "ErrorRecoveryLevel" => match number(value) {
            Some(_) => Some("0".into()),
            None => reject(),
        },
        // Nothing is kept for a lost connection (MIN with 0); logging in again needs no wait
        // beyond what the initiator asks (MAX).
        "DefaultTime2Retain" => number(value).map(|_| "0".into()).or_else(reject),
        "DefaultTime2Wait" => match number(value).filter(|&n| n <= 3600) {
            Some(n) => Some(n.max(2).to_string()),
            None => reject(),
        },
        // Markers are gone from RFC 7143; "No" (AND) is always acceptable.
        "IFMarker" | "OFMarker" => Some("No".into()),
        "IFMarkInt" | "OFMarkInt" => Some("Irrelevant".into()),
        "InitiatorAlias" => None,
        _ => Some("NotUnderstood".into()),
    }
}

/// A numerical value: decimal, or hexadecimal with `0x` (§6.1).
pub fn number(value: &str) -> Option<u32> {
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operational_keys_settle() {
        let mut p = Params::default();
        let mut ask = |k: &str, v: &str| answer(k, v, false, &mut p);
        assert_eq!(ask("HeaderDigest", "CRC32C,None").as_deref(), Some("None"));
        assert_eq!(ask("DataDigest", "CRC32C").as_deref(), Some("Reject"));
        assert_eq!(ask("MaxRecvDataSegmentLength", "262144"), None);
        assert_eq!(
            ask("MaxBurstLength", "16776192").as_deref(),
            Some("16776192")
        );
        assert_eq!(ask("FirstBurstLength", "262144").as_deref(), Some("65536"));
        assert_eq!(ask("ImmediateData", "No").as_deref(), Some("No"));
        assert_eq!(ask("InitialR2T", "No").as_deref(), Some("Yes"));
        assert_eq!(ask("MaxConnections", "8").as_deref(), Some("1"));
        assert_eq!(ask("ErrorRecoveryLevel", "2").as_deref(), Some("0"));
        assert_eq!(ask("DefaultTime2Wait", "0").as_deref(), Some("2"));
        assert_eq!(ask("DefaultTime2Retain", "20").as_deref(), Some("0"));
        assert_eq!(
            ask("X-com.example.Foo", "1").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(
            ask("MaxRecvDataSegmentLength", "12").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            ask("MaxBurstLength", "0x1000000").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            p,
            Params {
                max_send: 262_144,
                max_burst: 16_776_192,
                first_burst: 65536,
                immediate_data: false
            }
        );
        assert_eq!(
            answer("MaxBurstLength", "4096", true, &mut p).as_deref(),
            Some("Irrelevant")
        );
        assert_eq!(number("0x200"), Some(512));
        assert_eq!(number("-1"), None);
    }
}
