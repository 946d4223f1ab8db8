//! Bandwidth caps for a pod's network, applied on the host: a token-bucket
//! (`tbf`) root qdisc on the tap caps what the guest receives, and one on
//! the veth caps what it sends (the tap's frames are redirected to the
//! veth's egress, so they queue there). Being the host's, they hold for
//! either backend and whatever the guest does; a VMM's own limiter could
//! be switched off by a compromised VMM.
//!
//! netlink-packet-route has no tbf type, so its attributes are written here
//! (linux/pkt_sched.h).

/// Bytes per second each way, as seen from the guest; 0: no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bandwidth {
    pub guest_rx_bytes_per_second: u64,
    pub guest_tx_bytes_per_second: u64,
}

pub(super) const TBF_KIND: &str = "tbf";
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// The smallest bucket: a few 9000-byte frames, so one frame always fits
/// (tbf refuses a bucket smaller than a frame, and then drops it).
const MIN_BURST_BYTES: u64 = 64 * 1024;

/// One tbf: `rate`, a bucket of a tenth of a second of it (at least
/// [`MIN_BURST_BYTES`]), and as many bytes again queued before drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tbf {
    pub bytes_per_second: u64,
    pub burst_bytes: u32,
    pub limit_bytes: u32,
}

impl Tbf {
    pub fn for_rate(bytes_per_second: u64) -> Self {
        let burst = (bytes_per_second / 10).clamp(MIN_BURST_BYTES, u64::from(u32::MAX));
        let burst = u32::try_from(burst).unwrap_or(u32::MAX);
        Self {
            bytes_per_second,
            burst_bytes: burst,
            limit_bytes: burst,
        }
    }

    /// The qdisc's `TCA_OPTIONS` as (kind, value) attributes.
    pub fn attributes(&self) -> Vec<(u16, Vec<u8>)> {
        // struct tc_ratespec { u8 cell_log; u8 linklayer; u16 overhead;
        // s16 cell_align; u16 mpu; u32 rate; }. An Ethernet link layer
        // needs no rate table.
        let rate32 = u32::try_from(self.bytes_per_second).unwrap_or(u32::MAX);
        let mut rate = vec![0u8, TC_LINKLAYER_ETHERNET];
        rate.extend_from_slice(&[0; 6]);
        rate.extend_from_slice(&rate32.to_ne_bytes());
        // struct tc_tbf_qopt { rate; peakrate; u32 limit; u32 buffer;
        // u32 mtu; }: buffer comes from TCA_TBF_BURST; no peak rate, so no
        // mtu.
        let mut parms = rate;
        parms.extend_from_slice(&[0; 12]);
        parms.extend_from_slice(&self.limit_bytes.to_ne_bytes());
        parms.extend_from_slice(&0u32.to_ne_bytes());
        parms.extend_from_slice(&0u32.to_ne_bytes());
        let mut attributes = vec![
            (TCA_TBF_PARMS, parms),
            (TCA_TBF_BURST, self.burst_bytes.to_ne_bytes().to_vec()),
        ];
        if self.bytes_per_second > u64::from(u32::MAX) {
            attributes.push((TCA_TBF_RATE64, self.bytes_per_second.to_ne_bytes().to_vec()));
        }
        attributes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_is_a_tenth_of_a_second_but_never_below_a_few_frames() {
        assert_eq!(Tbf::for_rate(10_000_000).burst_bytes, 1_000_000);
        assert_eq!(Tbf::for_rate(1000).burst_bytes, 64 * 1024);
        assert_eq!(Tbf::for_rate(u64::MAX).burst_bytes, u32::MAX);
        assert_eq!(Tbf::for_rate(1000).limit_bytes, 64 * 1024);
    }

    #[test]
    fn parms_are_a_tc_tbf_qopt_and_big_rates_go_in_rate64() {
        let attributes = Tbf::for_rate(1_250_000).attributes();
        assert_eq!(attributes.len(), 2);
        let (kind, parms) = &attributes[0];
        assert_eq!(*kind, TCA_TBF_PARMS);
        assert_eq!(parms.len(), 36);
        assert_eq!(parms[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(
            u32::from_ne_bytes(parms[8..12].try_into().unwrap()),
            1_250_000
        );
        assert_eq!(
            u32::from_ne_bytes(parms[24..28].try_into().unwrap()),
            125_000
        );
        assert_eq!(attributes[1].0, TCA_TBF_BURST);

        let big = Tbf::for_rate(10_000_000_000).attributes();
        assert_eq!(big.len(), 3);
        assert_eq!(big[2].0, TCA_TBF_RATE64);
        assert_eq!(
            u64::from_ne_bytes(big[2].1.clone().try_into().unwrap()),
            10_000_000_000
        );
    }
}
