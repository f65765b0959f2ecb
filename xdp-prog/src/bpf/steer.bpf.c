// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
//
// Steers broker traffic into AF_XDP sockets; everything else goes to the kernel.
//
// Redirected into `xsks_map[ctx->rx_queue_index]`:
//   - IPv4 TCP, not fragmented, destination address in `broker_ips` AND destination port
//     in `broker_ports`;
//   - ARP (request or reply, Ethernet/IPv4) whose target protocol address is in
//     `broker_ips` (smoltcp learns neighbours only from ARP).
// Everything else returns XDP_PASS, so ssh and the rest of the host keep working.
//
// Map keys are stored exactly as they appear on the wire (network byte order):
//   broker_ips:   __u32 IPv4 address, network byte order (the address's 4 octets in order)
//   broker_ports: __u16 TCP port,     network byte order (big-endian)
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

// IPv4 "more fragments" flag and fragment offset mask in iphdr.frag_off (host order).
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff

// <linux/if_arp.h> pulls in glibc's <sys/socket.h>, which does not build for -target bpf,
// so the ARP header (RFC 826, as in that file) is declared here.
#define ARPHRD_ETHER 1
struct arphdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	unsigned char ar_hln;
	unsigned char ar_pln;
	__be16 ar_op;
};

// Body of an Ethernet/IPv4 ARP packet, after struct arphdr.
struct arp_ipv4 {
	unsigned char sha[ETH_ALEN];
	__be32 spa;
	unsigned char tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));

// One slot of the per-CPU counter array. Keep in sync with `Counters` in src/lib.rs.
struct counters {
	__u64 redirected; // steered and handed to bpf_redirect_map with a socket present
	__u64 passed;     // well-formed packets that are not broker traffic: XDP_PASS
	__u64 no_socket;  // broker traffic, but no socket on this rx queue: XDP_PASS
	__u64 malformed;  // too short to parse (truncated headers, bad IHL): XDP_PASS
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

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

enum verdict { PASS, STEER, MALFORMED };

static __always_inline enum verdict classify_ipv4(void *l3, void *data_end)
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
	return STEER;
}

static __always_inline enum verdict classify_arp(void *l3, void *data_end)
{
	struct arphdr *arp = l3;
	if ((void *)(arp + 1) > data_end)
		return MALFORMED;
	if (arp->ar_hrd != bpf_htons(ARPHRD_ETHER) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4)
		return PASS;
	struct arp_ipv4 *body = (void *)(arp + 1);
	if ((void *)(body + 1) > data_end)
		return MALFORMED;
	__u32 tpa = body->tpa;
	if (!bpf_map_lookup_elem(&broker_ips, &tpa))
		return PASS;
	return STEER;
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
			verdict = classify_ipv4(eth + 1, data_end);
		else if (eth->h_proto == bpf_htons(ETH_P_ARP))
			verdict = classify_arp(eth + 1, data_end);
		else
			verdict = PASS;
	}

	if (verdict == PASS) {
		count->passed++;
		return XDP_PASS;
	}
	if (verdict == MALFORMED) {
		count->malformed++;
		return XDP_PASS;
	}
	__u32 queue = ctx->rx_queue_index;
	if (!bpf_map_lookup_elem(&xsks_map, &queue)) {
		count->no_socket++;
		return XDP_PASS;
	}
	count->redirected++;
	return bpf_redirect_map(&xsks_map, queue, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
