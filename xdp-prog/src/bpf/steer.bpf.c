// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
//
// Steers broker traffic into AF_XDP sockets and answers SYNs with SYN cookies; everything
// else goes to the kernel.
//
// For an IPv4 TCP segment (not fragmented) whose destination address is in `broker_ips`
// and destination port in `broker_ports`, with a socket registered for the rx queue:
//   - a segment of a flow in `flows` (a connection userspace adopted) is redirected into
//     `xsks_map[ctx->rx_queue_index]`;
//   - a SYN is answered here, with a SYN-ACK whose sequence number is a SYN cookie (XDP_TX):
//     no state is kept for it, so a flood of spoofed SYNs costs no memory and never reaches
//     userspace; a SYN that cannot be answered (IPv4 options, no room to grow the frame)
//     is dropped;
//   - an ACK that carries a valid cookie is redirected; userspace adds its flow to `flows`
//     when it adopts the connection and removes it when the connection ends, so `flows`
//     holds exactly the adopted connections (this program never writes it);
//   - any other segment of an unknown flow is dropped.
// ARP and everything else returns XDP_PASS: the kernel keeps neighbour resolution, and ssh,
// ping and the other ports of the host keep working.
//
// The SYN-ACK offers MSS, window scale and timestamps (never SACK). With timestamps, the
// options the client offered are kept in the low bits of our tsval (the client echoes it in
// every ACK): bits 0-3 its window scale (15: none), bits 4-9 its MSS / 64 (0: no MSS
// option; an MSS below 64 counts as 64). Without timestamps the userspace side assumes MSS
// 536 and no window scaling.
//
// Map keys are stored exactly as they appear on the wire (network byte order):
//   broker_ips:   __u32 IPv4 address, network byte order (the address's 4 octets in order)
//   broker_ports: __u16 TCP port,     network byte order (big-endian)
//   flows:        struct flow_key, addresses and ports in network byte order
// The loader (src/lib.rs) writes them that way, so no byte swapping happens per packet.
//
// Each packet increments exactly one per-CPU counter (see `struct counters`).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_SOCKETS 64
#define MAX_PORTS 64
#define MAX_IPS 16
// The loader sets the real size of `flows` before loading (SteerConfig::flows_max).
#define DEFAULT_FLOWS 1024

// IPv4 "don't fragment", "more fragments" and fragment offset in iphdr.frag_off (host order).
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCPOPT_WINDOW 3
#define TCPOPT_TIMESTAMP 8
#define TCP_HEADER_MAX 60
#define TCP_OPTIONS_MAX 40
// Our SYN-ACK's TCP header: 20 bytes, MSS (4), NOP NOP TIMESTAMP (12), NOP WINDOW (4).
#define SYNACK_TCP_TS 40
#define SYNACK_TCP_PLAIN 24
#define TCP_MAX_WSCALE 14

// Low bits of our tsval that carry the client's options (see the top of this file).
#define TS_WSCALE_MASK 0xf
#define TS_WSCALE_NONE 0xf
#define TS_MSS_SHIFT 4
#define TS_MSS_UNIT 64
#define TS_MSS_MAX_CODE 63
// The MSS code of a SYN without an MSS option (no real MSS is below 64).
#define TS_MSS_NONE 0
#define TS_OPTION_BITS 10

// One slot of the per-CPU counter array. Keep in sync with `Counters` in src/lib.rs.
struct counters {
	__u64 redirected;      // segment of an established flow, handed to the socket
	__u64 passed;          // not broker traffic (ARP, other ports, ...): XDP_PASS
	__u64 no_socket;       // broker traffic, but no socket on this rx queue: XDP_PASS
	__u64 malformed;       // too short to parse (truncated headers, bad IHL): XDP_PASS
	__u64 syn_cookie_sent; // SYN answered with a cookie SYN-ACK: XDP_TX
	__u64 cookie_valid;    // ACK with a valid cookie: flow opened, handed to the socket
	__u64 cookie_invalid;  // other segment of an unknown flow (bad cookie, RST, ...): dropped
	__u64 syn_dropped;     // SYN that cannot be answered (IPv4 options, no tail room): dropped
};

// An established flow, as seen in a segment the client sent.
struct flow_key {
	__u32 remote_ip;
	__u32 local_ip;
	__u16 remote_port;
	__u16 local_port;
};

// What the SYN-ACK offers. Keep in sync with `SynCookieValues` in src/lib.rs.
struct syncookie_values {
	__u16 mss;          // our MSS (host order)
	__u16 window;       // the SYN-ACK's window (host order; never scaled)
	__u8 window_shift;  // our window scale: must be what the userspace stack uses
	__u8 ttl;
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} broker_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IPS);
	__type(key, __u32);
	__type(value, __u8);
} broker_ips SEC(".maps");

// Written by userspace only (see the top of this file). A plain hash, not an LRU: an
// evicted live flow would fail the cookie check and be dropped until it timed out.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_FLOWS);
	__type(key, struct flow_key);
	__type(value, __u8);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct syncookie_values);
} syncookie_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

enum verdict { PASS, MALFORMED, NO_SOCKET, REDIRECT, NEW_FLOW, SYN, SYN_DROP, DROP };

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// What a SYN offered, from its options.
struct syn_options {
	__u32 tsval; // network order
	__u16 mss;   // 0: no MSS option
	__u8 wscale;
	__u8 timestamp;
};

// State of the option parser: a copy of the options area, the next offset, and what was
// found. A bpf_loop callback parses one option per call, so the verifier checks it once
// instead of once per iteration of an unrolled loop.
struct option_parser {
	__u8 bytes[TCP_OPTIONS_MAX];
	__u32 offset;
	__u32 length;
	struct syn_options found;
};

static long parse_one_option(__u32 index, void *context)
{
	struct option_parser *parser = context;
	__u32 off = parser->offset;
	if (off >= parser->length || off >= TCP_OPTIONS_MAX)
		return 1;
	__u8 kind = parser->bytes[off];
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		parser->offset = off + 1;
		return 0;
	}
	if (off + 2 > TCP_OPTIONS_MAX)
		return 1;
	__u8 len = parser->bytes[off + 1];
	if (len < 2 || off + len > parser->length)
		return 1;
	if (kind == TCPOPT_MSS && len == 4 && off + 4 <= TCP_OPTIONS_MAX) {
		parser->found.mss = ((__u16)parser->bytes[off + 2] << 8) | parser->bytes[off + 3];
	} else if (kind == TCPOPT_WINDOW && len == 3 && off + 3 <= TCP_OPTIONS_MAX) {
		__u8 shift = parser->bytes[off + 2];
		parser->found.wscale = shift < TCP_MAX_WSCALE ? shift : TCP_MAX_WSCALE;
	} else if (kind == TCPOPT_TIMESTAMP && len == 10 && off + 10 <= TCP_OPTIONS_MAX) {
		parser->found.timestamp = 1;
		__builtin_memcpy(&parser->found.tsval, &parser->bytes[off + 2], 4);
	}
	parser->offset = off + len;
	return 0;
}

// Reads the options of the SYN's TCP header (`tcp_len` bytes at `tcp_offset`; the frame
// holds a full-size header there, the caller made sure).
static __always_inline void parse_syn_options(struct xdp_md *ctx, __u32 tcp_offset,
					      __u32 tcp_len, struct syn_options *out)
{
	struct option_parser parser = {
		.offset = 0,
		.length = tcp_len - sizeof(struct tcphdr),
		.found = { .tsval = 0, .mss = 0, .wscale = TS_WSCALE_NONE, .timestamp = 0 },
	};
	if (bpf_xdp_load_bytes(ctx, tcp_offset + sizeof(struct tcphdr), parser.bytes,
			       TCP_OPTIONS_MAX) == 0)
		bpf_loop(TCP_OPTIONS_MAX, parse_one_option, &parser, 0);
	*out = parser.found;
}

static __always_inline void syncookie_values(struct syncookie_values *out)
{
	__u32 zero = 0;
	struct syncookie_values *values = bpf_map_lookup_elem(&syncookie_config, &zero);
	if (values && values->mss) {
		*out = *values;
		return;
	}
	out->mss = 1460;
	out->window = 65535;
	out->window_shift = 0;
	out->ttl = 64;
}

// Turns the SYN in the frame into the SYN-ACK that carries its cookie, in place. Returns
// SYN when the frame is ready for XDP_TX, SYN_DROP when the SYN cannot be answered.
static __always_inline enum verdict answer_syn(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return SYN_DROP;
	__u32 tcp_len = tcp->doff * 4;
	if (tcp_len < sizeof(*tcp))
		return SYN_DROP;
	// Grow the frame so that a full-size TCP header fits: the helper that makes the
	// cookie reads `tcp_len` bytes, and the verifier must see them in the packet.
	long grow = (long)(TCP_HEADER_MAX - tcp_len);
	if (bpf_xdp_adjust_tail(ctx, grow))
		return SYN_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	tcp = (void *)(ip + 1);
	if ((void *)tcp + TCP_HEADER_MAX > data_end)
		return SYN_DROP;
	tcp_len = tcp->doff * 4;
	if (tcp_len < sizeof(*tcp) || tcp_len > TCP_HEADER_MAX)
		return SYN_DROP;
	__s64 generated = bpf_tcp_raw_gen_syncookie_ipv4(ip, tcp, tcp_len);
	if (generated < 0)
		return SYN_DROP;
	__u32 cookie = (__u32)generated;

	struct syn_options offered;
	parse_syn_options(ctx, sizeof(*eth) + sizeof(*ip), tcp_len, &offered);
	// The helper may invalidate packet pointers: load them again.
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	tcp = (void *)(ip + 1);
	if ((void *)tcp + TCP_HEADER_MAX > data_end)
		return SYN_DROP;
	struct syncookie_values values;
	syncookie_values(&values);

	// Ethernet and IPv4: back to where the SYN came from.
	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	__u32 address = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = address;
	ip->tos = 0;
	ip->id = 0;
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = values.ttl;

	// TCP: the cookie is our initial sequence number.
	__u16 port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	tcp->ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + 1);
	tcp->seq = bpf_htonl(cookie);
	tcp->res1 = 0;
	tcp->fin = 0;
	tcp->syn = 1;
	tcp->rst = 0;
	tcp->psh = 0;
	tcp->ack = 1;
	tcp->urg = 0;
	tcp->ece = 0;
	tcp->cwr = 0;
	tcp->window = bpf_htons(values.window);
	tcp->urg_ptr = 0;
	tcp->check = 0;

	__u8 *options = (__u8 *)(tcp + 1);
	options[0] = TCPOPT_MSS;
	options[1] = 4;
	options[2] = values.mss >> 8;
	options[3] = values.mss & 0xff;
	__u32 new_tcp_len = SYNACK_TCP_PLAIN;
	if (offered.timestamp) {
		__u32 mss_code = offered.mss / TS_MSS_UNIT;
		if (mss_code > TS_MSS_MAX_CODE)
			mss_code = TS_MSS_MAX_CODE;
		if (offered.mss && mss_code == TS_MSS_NONE)
			mss_code = 1;
		__u32 now_ms = bpf_ktime_get_ns() / 1000000;
		__u32 tsval = (now_ms & ~((1u << TS_OPTION_BITS) - 1)) |
			      (mss_code << TS_MSS_SHIFT) | (offered.wscale & TS_WSCALE_MASK);
		__u32 tsval_be = bpf_htonl(tsval);
		options[4] = TCPOPT_NOP;
		options[5] = TCPOPT_NOP;
		options[6] = TCPOPT_TIMESTAMP;
		options[7] = 10;
		__builtin_memcpy(options + 8, &tsval_be, 4);
		__builtin_memcpy(options + 12, &offered.tsval, 4);
		// Window scaling only when the client offered it (RFC 7323: both or neither).
		options[16] = TCPOPT_NOP;
		options[17] = offered.wscale == TS_WSCALE_NONE ? TCPOPT_NOP : TCPOPT_WINDOW;
		options[18] = offered.wscale == TS_WSCALE_NONE ? TCPOPT_NOP : 3;
		options[19] = offered.wscale == TS_WSCALE_NONE ? TCPOPT_NOP : values.window_shift;
		new_tcp_len = SYNACK_TCP_TS;
	}
	tcp->doff = new_tcp_len / 4;
	ip->tot_len = bpf_htons(sizeof(*ip) + new_tcp_len);

	// Checksums: IPv4 header, then TCP with the pseudo-header.
	ip->check = 0;
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	if (sum < 0)
		return SYN_DROP;
	ip->check = csum_fold(sum);
	if (new_tcp_len == SYNACK_TCP_TS)
		sum = bpf_csum_diff(0, 0, (__be32 *)tcp, SYNACK_TCP_TS, 0);
	else
		sum = bpf_csum_diff(0, 0, (__be32 *)tcp, SYNACK_TCP_PLAIN, 0);
	if (sum < 0)
		return SYN_DROP;
	__u64 pseudo = (__u64)sum + ip->saddr + ip->daddr +
		       bpf_htons((__u16)IPPROTO_TCP) + bpf_htons((__u16)new_tcp_len);
	tcp->check = csum_fold(pseudo);

	long new_len = (long)(sizeof(*eth) + sizeof(*ip) + new_tcp_len);
	if (bpf_xdp_adjust_tail(ctx, new_len - (long)(data_end - data)))
		return SYN_DROP;
	return SYN;
}

// Classifies a broker-bound TCP segment by its flow and flags.
static __always_inline enum verdict classify_segment(struct iphdr *ip, struct tcphdr *tcp)
{
	struct flow_key key = {
		.remote_ip = ip->saddr,
		.local_ip = ip->daddr,
		.remote_port = tcp->source,
		.local_port = tcp->dest,
	};
	if (bpf_map_lookup_elem(&flows, &key))
		return REDIRECT;
	if (tcp->syn && !tcp->ack && !tcp->rst && !tcp->fin)
		return ip->ihl == 5 ? SYN : SYN_DROP;
	if (!tcp->ack || tcp->syn || tcp->rst)
		return DROP;
	if (bpf_tcp_raw_check_syncookie_ipv4(ip, tcp))
		return DROP;
	return NEW_FLOW;
}

static __always_inline enum verdict classify_ipv4(struct xdp_md *ctx, void *l3, void *data_end)
{
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > data_end)
		return MALFORMED;
	if (ip->ihl < 5)
		return MALFORMED;
	if (ip->protocol != IPPROTO_TCP)
		return PASS;
	// Later fragments carry no TCP header; first fragments are passed too, so that a
	// fragmented segment is never split between the socket and the kernel.
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFMASK))
		return PASS;
	__u32 daddr = ip->daddr;
	if (!bpf_map_lookup_elem(&broker_ips, &daddr))
		return PASS;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > data_end)
		return MALFORMED;
	__u16 dport = tcp->dest;
	if (!bpf_map_lookup_elem(&broker_ports, &dport))
		return PASS;
	__u32 queue = ctx->rx_queue_index;
	if (!bpf_map_lookup_elem(&xsks_map, &queue))
		return NO_SOCKET;
	return classify_segment(ip, tcp);
}

SEC("xdp")
int xdp_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct counters *count = bpf_map_lookup_elem(&counters, &zero);
	if (!count)
		return XDP_PASS;

	enum verdict verdict = MALFORMED;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) <= data_end) {
		if (eth->h_proto == bpf_htons(ETH_P_IP))
			verdict = classify_ipv4(ctx, eth + 1, data_end);
		else
			verdict = PASS;
	}

	switch (verdict) {
	case PASS:
		count->passed++;
		return XDP_PASS;
	case MALFORMED:
		count->malformed++;
		return XDP_PASS;
	case NO_SOCKET:
		count->no_socket++;
		return XDP_PASS;
	case SYN:
		if (answer_syn(ctx) == SYN) {
			count->syn_cookie_sent++;
			return XDP_TX;
		}
		count->syn_dropped++;
		return XDP_DROP;
	case SYN_DROP:
		count->syn_dropped++;
		return XDP_DROP;
	case DROP:
		count->cookie_invalid++;
		return XDP_DROP;
	case NEW_FLOW:
		count->cookie_valid++;
		break;
	case REDIRECT:
		count->redirected++;
		break;
	}
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
