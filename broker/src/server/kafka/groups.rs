//! Consumer groups: JoinGroup, SyncGroup, Heartbeat and LeaveGroup, as Kafka's classic
//! group protocol has them, so that consumers that `subscribe()` share a group's partitions.
//!
//! One broker coordinates all groups (the lowest live broker id with a Kafka listener, see
//! `peers`); the others answer `NOT_COORDINATOR` and clients ask FindCoordinator again.
//! Membership is kept in the coordinator's memory, as Kafka keeps it: when the coordinator
//! changes, members learn it on their next request, find the new one and join again. Their
//! committed offsets are not in memory: they are records of the shared log (`offsets`).
//!
//! [`Groups`] is the state machine without I/O: requests in, with the time; answers out.
//! A JoinGroup waits until every member has joined again (or the rebalance timeout ends);
//! a follower's SyncGroup waits for the leader's assignment. Waiting answers are polled
//! ([`Groups::join_result`], [`Groups::sync_result`]); a group is looked at again whenever
//! it is touched, and all of them every [`SWEEP_INTERVAL`], so members that stopped
//! heartbeating leave their group within their session timeout of its next request.
//!
//! Static membership (`group.instance.id`) is taken as identity only: a member that joins
//! with the instance id of another replaces it; it is not kept over a session timeout.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{
    DescribedGroup as DescribedGroupResponse, DescribedGroupMember,
};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    ApiKey, DescribeGroupsRequest, DescribeGroupsResponse, GroupId, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsRequest, ListGroupsResponse, RequestHeader, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;
use units::Timestamp;

use super::data::Answer;
use super::{KafkaContext, KafkaSession, error_code, respond};

/// Members of all groups this broker coordinates, at most.
pub const MEMBERS_MAX: usize = 4096;
/// Members of one group, at most.
pub const GROUP_MEMBERS_MAX: usize = 1000;
/// Members that the clients of one address may hold at most (a quarter of all), so that
/// one host cannot take every place of the table.
pub const MEMBERS_PER_HOST_MAX: usize = MEMBERS_MAX / 4;
/// The most bytes of protocol metadata one member joins with, and of one member's
/// assignment.
pub const MEMBER_BYTES_MAX: usize = 16 << 10;
/// The longest member id, instance id, client id or protocol name taken (bytes).
pub const NAME_BYTES_MAX: usize = 255;
/// The session timeouts taken (Kafka's `group.min.session.timeout.ms` is 6 s; a shorter
/// floor lets tests and impatient clients detect a dead member sooner).
pub const SESSION_TIMEOUT_MS_MIN: i32 = 1_000;
/// See [`SESSION_TIMEOUT_MS_MIN`] (Kafka's `group.max.session.timeout.ms` is 30 min).
pub const SESSION_TIMEOUT_MS_MAX: i32 = 1_800_000;
/// The longest rebalance a group waits for its members to join again.
pub const REBALANCE_TIMEOUT_MS_MAX: i32 = 300_000;
/// How long a group that had no members waits for more to join before it forms (Kafka's
/// `group.initial.rebalance.delay.ms` is 3 s).
pub const INITIAL_REBALANCE_DELAY: Duration = Duration::from_millis(300);
/// How often every group is looked at for members whose session ended.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why a group request is refused (each a Kafka error code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The member is not (or no longer) in the group: it must join again.
    #[error("the member is not in the group (its session ended, or it left); join again")]
    UnknownMember,
    /// The member's generation is not the group's.
    #[error("generation {0} is not the group's current one")]
    IllegalGeneration(i32),
    /// The group is rebalancing: the member must join again.
    #[error("the group is rebalancing; join again")]
    RebalanceInProgress,
    /// The member's protocol type or protocols do not match the group's.
    #[error("{0}")]
    InconsistentProtocol(&'static str),
    /// A session timeout outside what is taken.
    #[error("session timeout {0} ms (taken: {SESSION_TIMEOUT_MS_MIN} to {SESSION_TIMEOUT_MS_MAX})")]
    InvalidSessionTimeout(i32),
    /// An empty or too long group id.
    #[error(
        "group id empty or longer than {} bytes",
        super::offsets::GROUP_BYTES_MAX
    )]
    InvalidGroupId,
    /// The group, or this coordinator, has all the members it takes.
    #[error(
        "no room for another member ({GROUP_MEMBERS_MAX} per group, {MEMBERS_PER_HOST_MAX} per client address, {MEMBERS_MAX} in all)"
    )]
    GroupFull,
    /// A field larger than its limit.
    #[error("{0}")]
    TooLarge(&'static str),
    /// A new member without an id (JoinGroup version 4 on): here is its id, join again with it.
    #[error("join again with the member id given")]
    MemberIdRequired(String),
}

impl GroupError {
    /// Kafka's error code for it.
    pub fn code(&self) -> i16 {
        match self {
            GroupError::UnknownMember => error_code::UNKNOWN_MEMBER_ID,
            GroupError::IllegalGeneration(_) => error_code::ILLEGAL_GENERATION,
            GroupError::RebalanceInProgress => error_code::REBALANCE_IN_PROGRESS,
            GroupError::InconsistentProtocol(_) => error_code::INCONSISTENT_GROUP_PROTOCOL,
            GroupError::InvalidSessionTimeout(_) => error_code::INVALID_SESSION_TIMEOUT,
            GroupError::InvalidGroupId => error_code::INVALID_GROUP_ID,
            GroupError::GroupFull => error_code::GROUP_MAX_SIZE_REACHED,
            GroupError::TooLarge(_) => error_code::INVALID_REQUEST,
            GroupError::MemberIdRequired(_) => error_code::MEMBER_ID_REQUIRED,
        }
    }
}

/// A JoinGroup, as the state machine takes it.
#[derive(Debug, Clone)]
pub struct Join {
    /// The group id.
    pub group: String,
    /// The member's id; empty for a new member.
    pub member_id: String,
    /// Its static instance id, if any.
    pub instance_id: Option<String>,
    /// The client id of its request header (the prefix of a new member's id).
    pub client_id: String,
    /// The client's address (empty when unknown).
    pub client_host: String,
    /// Milliseconds without a request after which it leaves the group.
    pub session_timeout_ms: i32,
    /// Milliseconds the group waits for it to join again in a rebalance.
    pub rebalance_timeout_ms: i32,
    /// The kind of group ("consumer" for consumers).
    pub protocol_type: String,
    /// The assignment protocols it speaks, its preferred first, with its metadata for each.
    pub protocols: Vec<(String, Bytes)>,
    /// Whether a new member gets its id first and must join again with it (version 4 on).
    pub requires_member_id: bool,
}

/// A JoinGroup's answer once the group formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The group's new generation.
    pub generation: i32,
    /// The group's protocol type.
    pub protocol_type: String,
    /// The assignment protocol every member speaks.
    pub protocol: String,
    /// The leader's member id (the leader computes the assignment).
    pub leader: String,
    /// This member's id.
    pub member_id: String,
    /// For the leader: every member (id, instance id, metadata for `protocol`); for the
    /// others: none.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

/// A JoinGroup taken: it waits for the group to form (poll [`Groups::join_result`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTicket {
    /// The group.
    pub group: String,
    /// The member (its new id for a new member).
    pub member_id: String,
    /// Which of the member's JoinGroups this is (a later one supersedes it).
    pub ticket: u64,
}

/// A group as DescribeGroups shows it (see [`Groups::describe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribedGroup {
    /// Kafka's name of its state.
    pub state: &'static str,
    /// Its protocol type.
    pub protocol_type: String,
    /// Its protocol (empty before it first formed).
    pub protocol: String,
    /// Its members.
    pub members: Vec<DescribedMember>,
}

/// A member as DescribeGroups shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribedMember {
    /// Its member id.
    pub member_id: String,
    /// Its static instance id, if any.
    pub instance_id: Option<String>,
    /// The client id it joined with.
    pub client_id: String,
    /// The address it joined from.
    pub client_host: String,
    /// Its metadata for the group's protocol.
    pub metadata: Bytes,
    /// Its assignment (empty until the leader gave one).
    pub assignment: Bytes,
}

#[derive(Debug)]
enum Phase {
    /// Members join (again); the group forms when all did, or at `deadline`. A group that
    /// had no members waits at least until `settle`.
    Joining {
        deadline: Timestamp,
        settle: Timestamp,
    },
    /// Formed: the members wait for the leader's assignment.
    Syncing,
    /// Every member has its assignment.
    Stable,
}

#[derive(Debug)]
struct Member {
    instance_id: Option<String>,
    /// The client id of its JoinGroup (for DescribeGroups).
    client_id: String,
    /// The client's address.
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    /// The ticket of its JoinGroup that waits for the group to form.
    waiting: Option<u64>,
    /// The answer to its JoinGroup of that ticket, until polled.
    joined: Option<(u64, Joined)>,
    assignment: Bytes,
    /// Its last request (a member silent for its session timeout leaves).
    last_seen: Timestamp,
    /// When it first joined (the oldest member leads).
    since: u64,
}

#[derive(Debug)]
struct Group {
    phase: Phase,
    generation: i32,
    protocol_type: String,
    protocol: String,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
}

/// The groups this broker coordinates.
#[derive(Debug)]
pub struct Groups {
    groups: HashMap<String, Group>,
    /// Members of all groups.
    members: usize,
    /// Makes member ids unique across coordinators and restarts.
    salt: u64,
    /// The next member id's number, and the next join ticket.
    next_member: u64,
    next_ticket: u64,
    swept: Option<Timestamp>,
}

impl Groups {
    /// No groups; new member ids carry `salt`.
    pub fn new(salt: u64) -> Groups {
        Groups {
            groups: HashMap::new(),
            members: 0,
            salt,
            next_member: 0,
            next_ticket: 0,
            swept: None,
        }
    }

    /// Members of all groups.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Takes a JoinGroup: refused at once, or waiting for the group to form.
    pub fn join(&mut self, join: Join, now: Timestamp) -> Result<JoinTicket, GroupError> {
        self.sweep(now);
        check_join(&join)?;
        let session_timeout = millis(join.session_timeout_ms);
        let rebalance_timeout = millis(join.rebalance_timeout_ms.min(REBALANCE_TIMEOUT_MS_MAX));
        if let Some(group) = self.groups.get_mut(&join.group) {
            self.members -= group.tick(now);
            if !group.members.is_empty() {
                if group.protocol_type != join.protocol_type {
                    return Err(GroupError::InconsistentProtocol(
                        "the protocol type differs from the group's",
                    ));
                }
                let spoken_by_all = |name: &String| {
                    group.members.iter().all(|(id, member)| {
                        *id == join.member_id || member.protocols.iter().any(|(n, _)| n == name)
                    })
                };
                if !join.protocols.iter().any(|(name, _)| spoken_by_all(name)) {
                    return Err(GroupError::InconsistentProtocol(
                        "no assignment protocol in common with the group's members",
                    ));
                }
            }
        }
        let mut member_id = join.member_id;
        if member_id.is_empty() {
            let client: String = join.client_id.chars().take(64).collect();
            member_id = format!("{client}-{:016x}-{}", self.salt, self.next_member);
            self.next_member += 1;
            if join.requires_member_id && join.instance_id.is_none() {
                return Err(GroupError::MemberIdRequired(member_id));
            }
        }
        // Counted at each join (they are rare) rather than kept up to date at every way a
        // member goes.
        let host_members = if join.client_host.is_empty() {
            0
        } else {
            self.groups
                .values()
                .flat_map(|g| g.members.values())
                .filter(|m| m.client_host == join.client_host)
                .count()
        };
        let group = self
            .groups
            .entry(join.group.clone())
            .or_insert_with(|| Group {
                phase: Phase::Stable,
                generation: 0,
                protocol_type: join.protocol_type.clone(),
                protocol: String::new(),
                leader: None,
                members: BTreeMap::new(),
            });
        let first = group.members.is_empty();
        // A static member replaces the member that had its instance id.
        if let Some(instance) = &join.instance_id {
            let replaced: Vec<String> = group
                .members
                .iter()
                .filter(|(id, m)| **id != member_id && m.instance_id.as_ref() == Some(instance))
                .map(|(id, _)| id.clone())
                .collect();
            for id in replaced {
                group.members.remove(&id);
                self.members -= 1;
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        match group.members.get_mut(&member_id) {
            Some(member) => {
                member.client_id = client_name(&join.client_id);
                member.protocols = join.protocols;
                member.session_timeout = session_timeout;
                member.rebalance_timeout = rebalance_timeout;
                member.instance_id = join.instance_id;
                member.waiting = Some(ticket);
                member.joined = None;
                member.last_seen = now;
            }
            None => {
                if self.members >= MEMBERS_MAX
                    || host_members >= MEMBERS_PER_HOST_MAX
                    || group.members.len() >= GROUP_MEMBERS_MAX
                {
                    if group.members.is_empty() {
                        self.groups.remove(&join.group);
                    }
                    return Err(GroupError::GroupFull);
                }
                group.protocol_type = join.protocol_type;
                group.members.insert(
                    member_id.clone(),
                    Member {
                        instance_id: join.instance_id,
                        client_id: client_name(&join.client_id),
                        client_host: join.client_host,
                        session_timeout,
                        rebalance_timeout,
                        protocols: join.protocols,
                        waiting: Some(ticket),
                        joined: None,
                        assignment: Bytes::new(),
                        last_seen: now,
                        since: ticket,
                    },
                );
                self.members += 1;
            }
        }
        match group.phase {
            Phase::Joining { .. } => {}
            Phase::Syncing | Phase::Stable => {
                let settle = if first {
                    now + INITIAL_REBALANCE_DELAY
                } else {
                    now
                };
                group.rebalance(now, settle);
            }
        }
        self.members -= group.tick(now);
        Ok(JoinTicket {
            group: join.group,
            member_id,
            ticket,
        })
    }

    /// The answer to the JoinGroup of `ticket`: `None` while the group forms.
    pub fn join_result(
        &mut self,
        ticket: &JoinTicket,
        now: Timestamp,
    ) -> Option<Result<Joined, GroupError>> {
        let Some(group) = self.groups.get_mut(&ticket.group) else {
            return Some(Err(GroupError::UnknownMember));
        };
        self.members -= group.tick(now);
        let Some(member) = group.members.get_mut(&ticket.member_id) else {
            self.forget_if_empty(&ticket.group);
            return Some(Err(GroupError::UnknownMember));
        };
        match &member.joined {
            Some((t, _)) if *t == ticket.ticket => member.joined.take().map(|(_, j)| Ok(j)),
            _ if member.waiting == Some(ticket.ticket) => None,
            // A later JoinGroup of the same member took its place.
            _ => Some(Err(GroupError::RebalanceInProgress)),
        }
    }

    /// Takes a SyncGroup: `Ok(Some(assignment))` at once, `Ok(None)` when it waits for the
    /// leader's (poll [`Groups::sync_result`]). The leader gives every member's assignment.
    pub fn sync(
        &mut self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
        now: Timestamp,
    ) -> Result<Option<Bytes>, GroupError> {
        let group = self.member_of(group_id, member_id, generation, now)?;
        match group.phase {
            Phase::Joining { .. } => Err(GroupError::RebalanceInProgress),
            Phase::Stable => Ok(Some(group.members[member_id].assignment.clone())),
            Phase::Syncing if group.leader.as_deref() == Some(member_id) => {
                if assignments.iter().any(|(_, a)| a.len() > MEMBER_BYTES_MAX) {
                    return Err(GroupError::TooLarge(
                        "an assignment is larger than a member's limit",
                    ));
                }
                for member in group.members.values_mut() {
                    member.assignment = Bytes::new();
                }
                for (id, assignment) in assignments {
                    if let Some(member) = group.members.get_mut(&id) {
                        member.assignment = assignment;
                    }
                }
                group.phase = Phase::Stable;
                Ok(Some(group.members[member_id].assignment.clone()))
            }
            Phase::Syncing => Ok(None),
        }
    }

    /// The answer to a SyncGroup that waits for the leader: `None` while it still does.
    pub fn sync_result(
        &mut self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        now: Timestamp,
    ) -> Option<Result<Bytes, GroupError>> {
        match self.member_of(group_id, member_id, generation, now) {
            Err(GroupError::IllegalGeneration(_)) => Some(Err(GroupError::RebalanceInProgress)),
            Err(refused) => Some(Err(refused)),
            Ok(group) => match group.phase {
                Phase::Joining { .. } => Some(Err(GroupError::RebalanceInProgress)),
                Phase::Stable => Some(Ok(group.members[member_id].assignment.clone())),
                Phase::Syncing => None,
            },
        }
    }

    /// The groups (id, protocol type, state), as ListGroups names them.
    pub fn list(&mut self, now: Timestamp) -> Vec<(String, String, &'static str)> {
        // Every group looked at now, not once per interval: the list is of groups as they
        // are.
        self.look_at_all(now);
        let mut listed: Vec<_> = self
            .groups
            .iter()
            .map(|(id, group)| (id.clone(), group.protocol_type.clone(), group.phase.name()))
            .collect();
        listed.sort();
        listed
    }

    /// A group as DescribeGroups shows it: its state, protocol type and protocol, and each
    /// member (id, instance id, client id, metadata for the group's protocol, assignment);
    /// `None` for a group this broker does not have.
    pub fn describe(&mut self, group_id: &str, now: Timestamp) -> Option<DescribedGroup> {
        self.sweep(now);
        let group = self.groups.get_mut(group_id)?;
        self.members -= group.tick(now);
        if group.members.is_empty() {
            self.groups.remove(group_id);
            return None;
        }
        let members = group
            .members
            .iter()
            .map(|(id, member)| DescribedMember {
                member_id: id.clone(),
                instance_id: member.instance_id.clone(),
                client_id: member.client_id.clone(),
                client_host: member.client_host.clone(),
                metadata: member
                    .protocols
                    .iter()
                    .find(|(name, _)| *name == group.protocol)
                    .map(|(_, metadata)| metadata.clone())
                    .unwrap_or_default(),
                assignment: member.assignment.clone(),
            })
            .collect();
        Some(DescribedGroup {
            state: group.phase.name(),
            protocol_type: group.protocol_type.clone(),
            protocol: group.protocol.clone(),
            members,
        })
    }

    /// Takes a Heartbeat, or checks a member's OffsetCommit: `Ok` when the member is in the
    /// group's current generation and the group is not rebalancing.
    pub fn heartbeat(
        &mut self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        now: Timestamp,
    ) -> Result<(), GroupError> {
        let group = self.member_of(group_id, member_id, generation, now)?;
        match group.phase {
            Phase::Joining { .. } => Err(GroupError::RebalanceInProgress),
            Phase::Syncing | Phase::Stable => Ok(()),
        }
    }

    /// Takes a LeaveGroup of one member, named by its member id, or (when that is empty)
    /// by its instance id.
    pub fn leave(
        &mut self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        now: Timestamp,
    ) -> Result<(), GroupError> {
        self.sweep(now);
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or(GroupError::UnknownMember)?;
        let id = if member_id.is_empty() {
            group
                .members
                .iter()
                .find(|(_, m)| m.instance_id.is_some() && m.instance_id.as_deref() == instance_id)
                .map(|(id, _)| id.clone())
        } else {
            Some(member_id.to_owned())
        };
        if id.and_then(|id| group.members.remove(&id)).is_none() {
            return Err(GroupError::UnknownMember);
        }
        self.members -= 1;
        if !matches!(group.phase, Phase::Joining { .. }) && !group.members.is_empty() {
            group.rebalance(now, now);
        }
        self.members -= group.tick(now);
        self.forget_if_empty(group_id);
        Ok(())
    }

    /// The group of a member of `generation`, looked at first.
    fn member_of(
        &mut self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        now: Timestamp,
    ) -> Result<&mut Group, GroupError> {
        self.sweep(now);
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or(GroupError::UnknownMember)?;
        self.members -= group.tick(now);
        if !group.members.contains_key(member_id) {
            self.forget_if_empty(group_id);
            return Err(GroupError::UnknownMember);
        }
        let group = self
            .groups
            .get_mut(group_id)
            .expect("the group has the member");
        let member = group.members.get_mut(member_id).expect("checked above");
        member.last_seen = now;
        if generation != group.generation {
            return Err(GroupError::IllegalGeneration(generation));
        }
        Ok(group)
    }

    fn forget_if_empty(&mut self, group_id: &str) {
        if self
            .groups
            .get(group_id)
            .is_some_and(|g| g.members.is_empty())
        {
            self.groups.remove(group_id);
        }
    }

    /// Looks at every group once per [`SWEEP_INTERVAL`]: members whose session ended leave.
    fn sweep(&mut self, now: Timestamp) {
        if self
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_INTERVAL)
        {
            return;
        }
        self.look_at_all(now);
    }

    /// Moves every group on at `now` (see `Group::tick`), and forgets those left empty.
    fn look_at_all(&mut self, now: Timestamp) {
        self.swept = Some(now);
        let mut left = 0;
        self.groups.retain(|_, group| {
            left += group.tick(now);
            !group.members.is_empty()
        });
        self.members -= left;
    }
}

impl Phase {
    /// Kafka's name of the state (a group without members is forgotten, so never "Empty").
    fn name(&self) -> &'static str {
        match self {
            Phase::Joining { .. } => "PreparingRebalance",
            Phase::Syncing => "CompletingRebalance",
            Phase::Stable => "Stable",
        }
    }
}

impl Group {
    /// Starts a rebalance: members must join again within the longest rebalance timeout.
    fn rebalance(&mut self, now: Timestamp, settle: Timestamp) {
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.phase = Phase::Joining {
            deadline: now + timeout,
            settle,
        };
    }

    /// Moves the group on at `now`: members whose session ended leave (starting a
    /// rebalance), a rebalance whose members all joined (or whose time is up) forms the
    /// group. Returns how many members left.
    fn tick(&mut self, now: Timestamp) -> usize {
        let before = self.members.len();
        let joining = matches!(self.phase, Phase::Joining { .. });
        // A member whose JoinGroup waits is not expired: the rebalance's deadline bounds it.
        self.members.retain(|_, m| {
            m.waiting.is_some() && joining
                || now.saturating_duration_since(m.last_seen) < m.session_timeout
        });
        let mut left = before - self.members.len();
        if left > 0 && !joining && !self.members.is_empty() {
            self.rebalance(now, now);
        }
        if let Phase::Joining { deadline, settle } = self.phase {
            let all_joined = self.members.values().all(|m| m.waiting.is_some());
            if now >= deadline || (all_joined && now >= settle) {
                let before = self.members.len();
                self.members.retain(|_, m| m.waiting.is_some());
                left += before - self.members.len();
                self.form(now);
            }
        }
        left
    }

    /// Ends a rebalance: a new generation of the members that joined, its leader and its
    /// protocol; every waiting JoinGroup gets its answer.
    fn form(&mut self, now: Timestamp) {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.phase = Phase::Syncing;
        if self.members.is_empty() {
            self.leader = None;
            return;
        }
        let leader = match &self.leader {
            Some(id) if self.members.contains_key(id) => id.clone(),
            _ => self
                .members
                .iter()
                .min_by_key(|(_, m)| m.since)
                .map(|(id, _)| id.clone())
                .expect("a group with members has an oldest"),
        };
        // The leader's most preferred protocol that every member speaks (a member joins
        // only when one is common to all).
        let protocol = self.members[&leader]
            .protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned()
            .unwrap_or_default();
        let everyone: Vec<(String, Option<String>, Bytes)> = self
            .members
            .iter()
            .map(|(id, m)| {
                let metadata = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, metadata)| metadata.clone())
                    .unwrap_or_default();
                (id.clone(), m.instance_id.clone(), metadata)
            })
            .collect();
        for (id, member) in &mut self.members {
            let ticket = member.waiting.take().expect("only joined members remain");
            member.last_seen = now;
            member.assignment = Bytes::new();
            member.joined = Some((
                ticket,
                Joined {
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol: protocol.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        everyone.clone()
                    } else {
                        Vec::new()
                    },
                },
            ));
        }
        self.protocol = protocol;
        self.leader = Some(leader);
    }
}

/// A client id as kept for DescribeGroups: at most [`NAME_BYTES_MAX`] bytes.
fn client_name(client_id: &str) -> String {
    let mut end = client_id.len().min(NAME_BYTES_MAX);
    while !client_id.is_char_boundary(end) {
        end -= 1;
    }
    client_id[..end].to_owned()
}

fn millis(ms: i32) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn check_join(join: &Join) -> Result<(), GroupError> {
    if join.group.is_empty() || join.group.len() > super::offsets::GROUP_BYTES_MAX {
        return Err(GroupError::InvalidGroupId);
    }
    if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&join.session_timeout_ms) {
        return Err(GroupError::InvalidSessionTimeout(join.session_timeout_ms));
    }
    if join.protocol_type.is_empty() || join.protocols.is_empty() {
        return Err(GroupError::InconsistentProtocol(
            "a protocol type and at least one protocol are required",
        ));
    }
    let names = [&join.member_id, &join.protocol_type]
        .into_iter()
        .chain(join.instance_id.as_ref())
        .chain(join.protocols.iter().map(|(name, _)| name));
    if names.into_iter().any(|name| name.len() > NAME_BYTES_MAX) {
        return Err(GroupError::TooLarge(
            "a member id, instance id or protocol name is longer than 255 bytes",
        ));
    }
    let metadata_bytes: usize = join.protocols.iter().map(|(_, m)| m.len()).sum();
    if metadata_bytes > MEMBER_BYTES_MAX {
        return Err(GroupError::TooLarge(
            "the protocols' metadata is larger than a member's limit (16 KiB)",
        ));
    }
    Ok(())
}

/// A JoinGroup waiting for its group to form.
#[derive(Debug)]
pub(super) struct PendingJoin {
    header: RequestHeader,
    version: i16,
    ticket: JoinTicket,
}

/// A follower's SyncGroup waiting for the leader's assignment.
#[derive(Debug)]
pub(super) struct PendingSync {
    header: RequestHeader,
    version: i16,
    group: String,
    generation: i32,
    member_id: String,
    protocol_type: String,
    protocol: String,
}

/// Whether this broker coordinates groups now (the lowest live broker id with a Kafka
/// listener does).
pub(super) fn coordinates(context: &mut dyn KafkaContext) -> bool {
    super::coordinator(context).id == context.node().id
}

fn join_response(
    header: &RequestHeader,
    version: i16,
    answer: Result<Joined, (GroupError, String)>,
) -> Vec<u8> {
    // Names that are not nullable before version 7 are empty strings in refusals.
    let response = match answer {
        Ok(joined) => JoinGroupResponse::default()
            .with_generation_id(joined.generation)
            .with_protocol_type(Some(StrBytes::from_string(joined.protocol_type)))
            .with_protocol_name(Some(StrBytes::from_string(joined.protocol)))
            .with_leader(StrBytes::from_string(joined.leader))
            .with_member_id(StrBytes::from_string(joined.member_id))
            .with_members(
                joined
                    .members
                    .into_iter()
                    .map(|(id, instance, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(StrBytes::from_string(id))
                            .with_group_instance_id(instance.map(StrBytes::from_string))
                            .with_metadata(metadata)
                    })
                    .collect(),
            ),
        Err((refused, member_id)) => {
            let member_id = match &refused {
                GroupError::MemberIdRequired(id) => id.clone(),
                _ => member_id,
            };
            log::debug!("JoinGroup refused: {refused}");
            JoinGroupResponse::default()
                .with_error_code(refused.code())
                .with_generation_id(-1)
                .with_protocol_name((version < 7).then(StrBytes::default))
                .with_member_id(StrBytes::from_string(member_id))
        }
    };
    respond(header, ApiKey::JoinGroup, version, &response)
}

fn sync_response(
    header: &RequestHeader,
    version: i16,
    answer: Result<Bytes, GroupError>,
    protocol: (&str, &str),
) -> Vec<u8> {
    let response = match answer {
        Ok(assignment) => SyncGroupResponse::default()
            .with_assignment(assignment)
            .with_protocol_type(Some(StrBytes::from_string(protocol.0.to_owned())))
            .with_protocol_name(Some(StrBytes::from_string(protocol.1.to_owned()))),
        Err(refused) => SyncGroupResponse::default().with_error_code(refused.code()),
    };
    respond(header, ApiKey::SyncGroup, version, &response)
}

/// The answer to a waiting JoinGroup, once its group formed.
pub(super) fn poll_join(
    pending: &PendingJoin,
    context: &mut dyn KafkaContext,
    now: Timestamp,
) -> Option<Vec<u8>> {
    let answer = context.groups().join_result(&pending.ticket, now)?;
    let member_id = pending.ticket.member_id.clone();
    Some(join_response(
        &pending.header,
        pending.version,
        answer.map_err(|refused| (refused, member_id)),
    ))
}

/// The answer to a waiting SyncGroup, once the leader gave the assignment.
pub(super) fn poll_sync(
    pending: &PendingSync,
    context: &mut dyn KafkaContext,
    now: Timestamp,
) -> Option<Vec<u8>> {
    let answer = context.groups().sync_result(
        &pending.group,
        pending.generation,
        &pending.member_id,
        now,
    )?;
    Some(sync_response(
        &pending.header,
        pending.version,
        answer,
        (&pending.protocol_type, &pending.protocol),
    ))
}

impl KafkaSession {
    /// JoinGroup: answered once the group formed (or at once when refused).
    pub(super) fn on_join_group(
        &mut self,
        header: RequestHeader,
        version: i16,
        request: JoinGroupRequest,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) {
        let member_id = request.member_id.to_string();
        if !coordinates(context) {
            let response = JoinGroupResponse::default()
                .with_error_code(error_code::NOT_COORDINATOR)
                .with_generation_id(-1)
                .with_protocol_name((version < 7).then(StrBytes::default))
                .with_member_id(request.member_id);
            let frame = respond(&header, ApiKey::JoinGroup, version, &response);
            self.answers.push_back(Answer::Ready(frame));
            return;
        }
        let join = Join {
            group: request.group_id.0.to_string(),
            member_id: member_id.clone(),
            instance_id: request.group_instance_id.map(|id| id.to_string()),
            client_id: header
                .client_id
                .as_ref()
                .map_or_else(String::new, |id| id.to_string()),
            client_host: self.peer.clone(),
            session_timeout_ms: request.session_timeout_ms,
            // Version 0 has no rebalance timeout: the session timeout is it.
            rebalance_timeout_ms: if version == 0 {
                request.session_timeout_ms
            } else {
                request.rebalance_timeout_ms
            },
            protocol_type: request.protocol_type.to_string(),
            protocols: request
                .protocols
                .into_iter()
                .map(|p| (p.name.to_string(), p.metadata))
                .collect(),
            requires_member_id: version >= 4,
        };
        let answer = match context.groups().join(join, now) {
            Err(refused) => {
                Answer::Ready(join_response(&header, version, Err((refused, member_id))))
            }
            Ok(ticket) => {
                let pending = PendingJoin {
                    header,
                    version,
                    ticket,
                };
                match poll_join(&pending, context, now) {
                    Some(frame) => Answer::Ready(frame),
                    None => Answer::Join(pending),
                }
            }
        };
        self.answers.push_back(answer);
    }

    /// SyncGroup: the leader's gives every member's assignment; a follower's waits for it.
    pub(super) fn on_sync_group(
        &mut self,
        header: RequestHeader,
        version: i16,
        request: SyncGroupRequest,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) {
        let pending = PendingSync {
            header,
            version,
            group: request.group_id.0.to_string(),
            generation: request.generation_id,
            member_id: request.member_id.to_string(),
            protocol_type: request
                .protocol_type
                .map_or_else(String::new, |t| t.to_string()),
            protocol: request
                .protocol_name
                .map_or_else(String::new, |n| n.to_string()),
        };
        let answer = if !coordinates(context) {
            Some(SyncGroupResponse::default().with_error_code(error_code::NOT_COORDINATOR))
        } else {
            let assignments = request
                .assignments
                .into_iter()
                .map(|a| (a.member_id.to_string(), a.assignment))
                .collect();
            match context.groups().sync(
                &pending.group,
                pending.generation,
                &pending.member_id,
                assignments,
                now,
            ) {
                Ok(None) => {
                    self.answers.push_back(Answer::Sync(pending));
                    return;
                }
                Ok(Some(assignment)) => Some(
                    SyncGroupResponse::default()
                        .with_assignment(assignment)
                        .with_protocol_type(Some(StrBytes::from_string(
                            pending.protocol_type.clone(),
                        )))
                        .with_protocol_name(Some(StrBytes::from_string(pending.protocol.clone()))),
                ),
                Err(refused) => {
                    log::debug!("SyncGroup refused: {refused}");
                    Some(SyncGroupResponse::default().with_error_code(refused.code()))
                }
            }
        };
        if let Some(response) = answer {
            let frame = respond(&pending.header, ApiKey::SyncGroup, version, &response);
            self.answers.push_back(Answer::Ready(frame));
        }
    }
}

/// Heartbeat: the member is alive; REBALANCE_IN_PROGRESS tells it to join again.
pub(super) fn heartbeat(
    request: &HeartbeatRequest,
    context: &mut dyn KafkaContext,
    now: Timestamp,
) -> HeartbeatResponse {
    let code = if !coordinates(context) {
        error_code::NOT_COORDINATOR
    } else {
        match context.groups().heartbeat(
            request.group_id.0.as_str(),
            request.generation_id,
            request.member_id.as_str(),
            now,
        ) {
            Ok(()) => 0,
            Err(refused) => refused.code(),
        }
    };
    HeartbeatResponse::default().with_error_code(code)
}

/// ListGroups: the groups this broker coordinates (none elsewhere: clients ask every
/// broker and put the answers together), by state (version 4 on) and type (5 on: all are
/// "classic").
pub(super) fn list_groups(
    request: &ListGroupsRequest,
    context: &mut dyn KafkaContext,
    now: Timestamp,
) -> ListGroupsResponse {
    if !coordinates(context) {
        return ListGroupsResponse::default();
    }
    let wanted_type = request.types_filter.is_empty()
        || request
            .types_filter
            .iter()
            .any(|t| t.eq_ignore_ascii_case("classic"));
    let groups = context
        .groups()
        .list(now)
        .into_iter()
        .filter(|_| wanted_type)
        .filter(|(_, _, state)| {
            request.states_filter.is_empty()
                || request
                    .states_filter
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(state))
        })
        .map(|(id, protocol_type, state)| {
            ListedGroup::default()
                .with_group_id(GroupId(StrBytes::from_string(id)))
                .with_protocol_type(StrBytes::from_string(protocol_type))
                .with_group_state(StrBytes::from_static_str(state))
                .with_group_type(StrBytes::from_static_str("classic"))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

/// DescribeGroups: each group's state, protocol and members; a group this broker does not
/// have is "Dead" with no members, as Kafka answers.
pub(super) fn describe_groups(
    request: &DescribeGroupsRequest,
    context: &mut dyn KafkaContext,
    now: Timestamp,
) -> DescribeGroupsResponse {
    let coordinator = coordinates(context);
    let groups = request
        .groups
        .iter()
        .map(|id| {
            let answer = DescribedGroupResponse::default()
                .with_group_id(id.clone())
                .with_authorized_operations(i32::MIN);
            if !coordinator {
                return answer.with_error_code(error_code::NOT_COORDINATOR);
            }
            match context.groups().describe(id.0.as_str(), now) {
                None => answer.with_group_state(StrBytes::from_static_str("Dead")),
                Some(group) => answer
                    .with_group_state(StrBytes::from_static_str(group.state))
                    .with_protocol_type(StrBytes::from_string(group.protocol_type))
                    .with_protocol_data(StrBytes::from_string(group.protocol))
                    .with_members(
                        group
                            .members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(StrBytes::from_string(m.member_id))
                                    .with_group_instance_id(
                                        m.instance_id.map(StrBytes::from_string),
                                    )
                                    .with_client_id(StrBytes::from_string(m.client_id))
                                    .with_client_host(StrBytes::from_string(m.client_host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
            }
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

/// LeaveGroup: one member (versions 0-2) or several (3 on) leave; the others rebalance.
pub(super) fn leave_group(
    request: &LeaveGroupRequest,
    version: i16,
    context: &mut dyn KafkaContext,
    now: Timestamp,
) -> LeaveGroupResponse {
    if !coordinates(context) {
        return LeaveGroupResponse::default().with_error_code(error_code::NOT_COORDINATOR);
    }
    let group = request.group_id.0.as_str();
    let mut leave = |member_id: &str, instance_id: Option<&str>| match context.groups().leave(
        group,
        member_id,
        instance_id,
        now,
    ) {
        Ok(()) => 0,
        Err(refused) => refused.code(),
    };
    if version < 3 {
        let code = leave(request.member_id.as_str(), None);
        return LeaveGroupResponse::default().with_error_code(code);
    }
    let members = request
        .members
        .iter()
        .map(|m| {
            let code = leave(
                m.member_id.as_str(),
                m.group_instance_id.as_ref().map(|id| id.as_str()),
            );
            MemberResponse::default()
                .with_member_id(m.member_id.clone())
                .with_group_instance_id(m.group_instance_id.clone())
                .with_error_code(code)
        })
        .collect();
    LeaveGroupResponse::default().with_members(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_nanos(1_000_000_000);

    fn at(ms: u64) -> Timestamp {
        T0 + Duration::from_millis(ms)
    }

    fn join(member_id: &str, protocols: &[&str]) -> Join {
        Join {
            group: "billing".into(),
            member_id: member_id.into(),
            instance_id: None,
            client_id: "app".into(),
            client_host: "10.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 5_000,
            protocol_type: "consumer".into(),
            protocols: protocols
                .iter()
                .map(|name| (name.to_string(), Bytes::from(format!("meta-{member_id}"))))
                .collect(),
            requires_member_id: true,
        }
    }

    /// A new member: its id first (MEMBER_ID_REQUIRED), then its join.
    fn new_member(groups: &mut Groups, now: Timestamp) -> JoinTicket {
        let Err(GroupError::MemberIdRequired(id)) = groups.join(join("", &["range"]), now) else {
            panic!("a new member gets its id first");
        };
        groups.join(join(&id, &["range"]), now).unwrap()
    }

    #[test]
    fn members_join_form_a_generation_and_get_the_leaders_assignment() {
        let mut groups = Groups::new(1);
        let a = new_member(&mut groups, at(0));
        assert!(a.member_id.starts_with("app-"));
        // An empty group waits a little for more members.
        assert_eq!(groups.join_result(&a, at(10)), None);
        let b = new_member(&mut groups, at(100));
        let joined_a = groups.join_result(&a, at(300)).unwrap().unwrap();
        let joined_b = groups.join_result(&b, at(300)).unwrap().unwrap();
        assert_eq!(joined_a.generation, 1);
        assert_eq!(joined_a.protocol, "range");
        assert_eq!(joined_a.leader, a.member_id, "the oldest member leads");
        assert_eq!(joined_a.members.len(), 2, "the leader learns every member");
        assert!(joined_b.members.is_empty());
        assert_eq!(
            groups.join_result(&a, at(300)),
            Some(Err(GroupError::RebalanceInProgress))
        );
        // The follower's SyncGroup waits for the leader's.
        assert_eq!(
            groups.sync("billing", 1, &b.member_id, vec![], at(301)),
            Ok(None)
        );
        assert_eq!(
            groups.sync_result("billing", 1, &b.member_id, at(302)),
            None
        );
        let assignments = vec![
            (a.member_id.clone(), Bytes::from_static(b"p0")),
            (b.member_id.clone(), Bytes::from_static(b"none")),
        ];
        assert_eq!(
            groups.sync("billing", 1, &a.member_id, assignments, at(303)),
            Ok(Some(Bytes::from_static(b"p0")))
        );
        assert_eq!(
            groups.sync_result("billing", 1, &b.member_id, at(304)),
            Some(Ok(Bytes::from_static(b"none")))
        );
        assert_eq!(
            groups.heartbeat("billing", 1, &b.member_id, at(305)),
            Ok(())
        );
        assert_eq!(
            groups.heartbeat("billing", 1, &a.member_id, at(305)),
            Ok(())
        );
        assert_eq!(
            groups.heartbeat("billing", 0, &a.member_id, at(305)),
            Err(GroupError::IllegalGeneration(0))
        );
        assert_eq!(
            groups.heartbeat("billing", 1, "stranger", at(305)),
            Err(GroupError::UnknownMember)
        );
        assert_eq!(groups.members(), 2);
    }

    #[test]
    fn a_member_that_leaves_or_goes_silent_makes_the_others_rebalance() {
        let mut groups = Groups::new(1);
        let a = new_member(&mut groups, at(0));
        let b = new_member(&mut groups, at(0));
        for ticket in [&a, &b] {
            groups.join_result(ticket, at(300)).unwrap().unwrap();
        }
        groups
            .sync("billing", 1, &a.member_id, vec![], at(300))
            .unwrap();
        // b leaves: a learns it from its heartbeat and joins again, alone.
        groups
            .leave("billing", &b.member_id, None, at(400))
            .unwrap();
        assert_eq!(
            groups.heartbeat("billing", 1, &a.member_id, at(401)),
            Err(GroupError::RebalanceInProgress)
        );
        let a2 = groups
            .join(join(&a.member_id, &["range"]), at(402))
            .unwrap();
        let joined = groups.join_result(&a2, at(402)).unwrap().unwrap();
        assert_eq!((joined.generation, joined.members.len()), (2, 1));
        groups
            .sync("billing", 2, &a.member_id, vec![], at(403))
            .unwrap();
        // A third member joins; a stays silent past its session timeout (10 s) while c
        // waits: the rebalance ends at its deadline (5 s) without a, and c leads alone.
        let c = new_member(&mut groups, at(1_000));
        assert_eq!(groups.join_result(&c, at(5_999)), None);
        let joined = groups.join_result(&c, at(6_000)).unwrap().unwrap();
        assert_eq!(
            (joined.generation, joined.leader.as_str()),
            (3, c.member_id.as_str())
        );
        assert_eq!(
            groups.heartbeat("billing", 3, &a.member_id, at(6_001)),
            Err(GroupError::UnknownMember),
            "a missed the rebalance"
        );
        assert_eq!(groups.members(), 1);
        // c goes silent too: the group is gone once its session ended.
        assert_eq!(
            groups.heartbeat("billing", 3, &c.member_id, at(17_000)),
            Err(GroupError::UnknownMember)
        );
        assert_eq!(groups.members(), 0);
    }

    #[test]
    fn a_follower_waiting_for_a_leader_that_died_is_told_to_join_again() {
        let mut groups = Groups::new(1);
        let a = new_member(&mut groups, at(0));
        let b = new_member(&mut groups, at(0));
        for ticket in [&a, &b] {
            groups.join_result(ticket, at(300)).unwrap().unwrap();
        }
        assert_eq!(
            groups.sync("billing", 1, &b.member_id, vec![], at(300)),
            Ok(None)
        );
        // b's wait keeps it in the group; the leader's session ends.
        for ms in (1_000..=10_000).step_by(1_000) {
            assert_eq!(groups.sync_result("billing", 1, &b.member_id, at(ms)), None);
        }
        assert_eq!(
            groups.sync_result("billing", 1, &b.member_id, at(10_301)),
            Some(Err(GroupError::RebalanceInProgress))
        );
    }

    #[test]
    fn joins_that_cannot_be_taken_are_refused_with_their_reason() {
        let mut groups = Groups::new(1);
        let mut bad = join("", &["range"]);
        bad.session_timeout_ms = 10;
        assert_eq!(
            groups.join(bad, at(0)),
            Err(GroupError::InvalidSessionTimeout(10))
        );
        let mut bad = join("", &["range"]);
        bad.group = String::new();
        assert_eq!(groups.join(bad, at(0)), Err(GroupError::InvalidGroupId));
        let mut bad = join("m", &["range"]);
        bad.protocols[0].1 = Bytes::from(vec![0; MEMBER_BYTES_MAX + 1]);
        assert!(matches!(
            groups.join(bad, at(0)),
            Err(GroupError::TooLarge(_))
        ));
        // A member that speaks no protocol of the group's members.
        let a = new_member(&mut groups, at(0));
        assert!(matches!(
            groups.join(join("other", &["roundrobin"]), at(1)),
            Err(GroupError::InconsistentProtocol(_))
        ));
        let mut other_type = join("other", &["range"]);
        other_type.protocol_type = "connect".into();
        assert!(matches!(
            groups.join(other_type, at(1)),
            Err(GroupError::InconsistentProtocol(_))
        ));
        assert_eq!(groups.members(), 1);
        assert!(groups.join_result(&a, at(300)).unwrap().is_ok());
    }

    #[test]
    fn a_group_takes_its_limit_of_members_and_no_more() {
        let mut groups = Groups::new(1);
        for n in 0..GROUP_MEMBERS_MAX {
            groups
                .join(join(&format!("m{n}"), &["range"]), at(0))
                .unwrap();
        }
        assert_eq!(
            groups.join(join("one-more", &["range"]), at(0)),
            Err(GroupError::GroupFull)
        );
        let mut elsewhere = join("x", &["range"]);
        elsewhere.group = "other".into();
        assert!(groups.join(elsewhere, at(0)).is_ok());
        assert_eq!(groups.members(), GROUP_MEMBERS_MAX + 1);
    }

    #[test]
    fn one_client_address_holds_at_most_its_share_of_the_members() {
        let mut groups = Groups::new(1);
        let from = |host: &str, group: usize, n: usize| {
            let mut j = join(&format!("m{n}"), &["range"]);
            j.group = format!("g{group}");
            j.client_host = host.into();
            j
        };
        for n in 0..MEMBERS_PER_HOST_MAX {
            groups.join(from("10.0.0.1", n / 500, n), at(0)).unwrap();
        }
        assert_eq!(
            groups.join(from("10.0.0.1", 99, 99_999), at(0)),
            Err(GroupError::GroupFull)
        );
        assert!(groups.join(from("10.0.0.2", 99, 99_999), at(0)).is_ok());
        assert_eq!(groups.members(), MEMBERS_PER_HOST_MAX + 1);
    }

    #[test]
    fn a_static_member_replaces_the_one_with_its_instance_id() {
        let mut groups = Groups::new(1);
        let mut first = join("", &["range"]);
        first.instance_id = Some("worker-1".into());
        let a = groups.join(first.clone(), at(0)).unwrap();
        groups.join_result(&a, at(300)).unwrap().unwrap();
        let b = groups.join(first, at(400)).unwrap();
        assert_ne!(a.member_id, b.member_id);
        assert_eq!(groups.members(), 1);
        let joined = groups.join_result(&b, at(400)).unwrap().unwrap();
        assert_eq!(joined.leader, b.member_id);
        assert_eq!(
            groups.heartbeat("billing", joined.generation, &a.member_id, at(401)),
            Err(GroupError::UnknownMember)
        );
    }
}

/// The group APIs through request frames, as clients send them.
#[cfg(test)]
mod session_tests {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::leave_group_request::MemberIdentity;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
    use kafka_protocol::messages::{GroupId, OffsetCommitRequest, OffsetCommitResponse, TopicName};
    use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

    use super::super::fake::FakeLog;
    use super::super::{KafkaNode, request_frame, response_body};
    use super::*;

    const T0: Timestamp = Timestamp::from_nanos(1_000_000_000);

    fn group_id(id: &'static str) -> GroupId {
        GroupId(StrBytes::from_static_str(id))
    }

    /// Sends a request; returns the answer's body if it is ready by `now`.
    fn send<R: Encodable + HeaderVersion>(
        session: &mut KafkaSession,
        log: &mut FakeLog,
        (key, version): (ApiKey, i16),
        body: &R,
        now: Timestamp,
    ) -> Option<Bytes> {
        let frame = request_frame(key, version, 1, body);
        session
            .on_request(Bytes::copy_from_slice(&frame[4..]), log, now)
            .unwrap();
        ready(session, log, (key, version), now)
    }

    /// The answer waiting at the front of `session`, if it is ready by `now`.
    fn ready(
        session: &mut KafkaSession,
        log: &mut FakeLog,
        (key, version): (ApiKey, i16),
        now: Timestamp,
    ) -> Option<Bytes> {
        for outcome in log.order_all() {
            session.on_outcome(&outcome);
        }
        session.poll(log, now, true);
        let mut out = Vec::new();
        session.take_ready(&mut out);
        (!out.is_empty()).then(|| response_body(&out, key, version).unwrap().1)
    }

    fn join_request(member_id: &str) -> JoinGroupRequest {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("billing")))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(5_000)
            .with_member_id(StrBytes::from_string(member_id.into()))
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str("range"))
                    .with_metadata(Bytes::from_static(b"subscription")),
            ])
    }

    fn joined(body: Bytes, version: i16) -> JoinGroupResponse {
        JoinGroupResponse::decode(&mut body.clone(), version).unwrap()
    }

    #[test]
    fn consumers_join_sync_heartbeat_commit_and_leave_through_frames() {
        let mut log = FakeLog::two_topics();
        let (mut a, mut b) = (KafkaSession::new(1), KafkaSession::new(2));
        let join = (ApiKey::JoinGroup, 5);
        // A new member learns its id first.
        let first = joined(
            send(&mut a, &mut log, join, &join_request(""), T0).unwrap(),
            5,
        );
        assert_eq!(first.error_code, error_code::MEMBER_ID_REQUIRED);
        let a_id = first.member_id.to_string();
        assert!(send(&mut a, &mut log, join, &join_request(&a_id), T0).is_none());
        // Version 0 (no member id required): b joins at once; both are answered.
        let early = T0 + Duration::from_millis(100);
        assert!(
            send(
                &mut b,
                &mut log,
                (ApiKey::JoinGroup, 0),
                &join_request(""),
                early
            )
            .is_none()
        );
        let at = T0 + Duration::from_millis(300);
        let a_joined = joined(ready(&mut a, &mut log, join, at).unwrap(), 5);
        let b_joined = joined(
            ready(&mut b, &mut log, (ApiKey::JoinGroup, 0), at).unwrap(),
            0,
        );
        assert_eq!(a_joined.error_code, 0);
        assert_eq!(
            (a_joined.generation_id, a_joined.leader.as_str()),
            (1, a_id.as_str())
        );
        assert_eq!(a_joined.members.len(), 2);
        assert_eq!(b_joined.protocol_name.as_deref(), Some("range"));
        let b_id = b_joined.member_id.to_string();
        // b's SyncGroup waits for the leader's, which assigns.
        let sync = |member: &str, assignments: Vec<(String, &'static [u8])>| {
            SyncGroupRequest::default()
                .with_group_id(GroupId(StrBytes::from_static_str("billing")))
                .with_generation_id(1)
                .with_member_id(StrBytes::from_string(member.into()))
                .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                .with_protocol_name(Some(StrBytes::from_static_str("range")))
                .with_assignments(
                    assignments
                        .into_iter()
                        .map(|(id, a)| {
                            SyncGroupRequestAssignment::default()
                                .with_member_id(StrBytes::from_string(id))
                                .with_assignment(Bytes::from_static(a))
                        })
                        .collect(),
                )
        };
        assert!(
            send(
                &mut b,
                &mut log,
                (ApiKey::SyncGroup, 5),
                &sync(&b_id, vec![]),
                at
            )
            .is_none()
        );
        let assignments = vec![(a_id.clone(), &b"orders"[..]), (b_id.clone(), &b"-"[..])];
        let a_synced = send(
            &mut a,
            &mut log,
            (ApiKey::SyncGroup, 5),
            &sync(&a_id, assignments),
            at,
        );
        let a_synced = SyncGroupResponse::decode(&mut a_synced.unwrap(), 5).unwrap();
        assert_eq!(
            (a_synced.error_code, &a_synced.assignment[..]),
            (0, &b"orders"[..])
        );
        assert_eq!(a_synced.protocol_name.as_deref(), Some("range"));
        let b_synced = ready(&mut b, &mut log, (ApiKey::SyncGroup, 5), at).unwrap();
        let b_synced = SyncGroupResponse::decode(&mut b_synced.clone(), 5).unwrap();
        assert_eq!(&b_synced.assignment[..], b"-");
        // Admin tools see the group, its members and their assignments.
        let listed = send(
            &mut a,
            &mut log,
            (ApiKey::ListGroups, 5),
            &ListGroupsRequest::default(),
            at,
        );
        let listed = ListGroupsResponse::decode(&mut listed.unwrap(), 5).unwrap();
        let names: Vec<(&str, &str)> = listed
            .groups
            .iter()
            .map(|g| (g.group_id.0.as_str(), g.group_state.as_str()))
            .collect();
        assert_eq!(names, vec![("billing", "Stable")]);
        let filtered = ListGroupsRequest::default()
            .with_states_filter(vec![StrBytes::from_static_str("PreparingRebalance")]);
        let none = send(&mut a, &mut log, (ApiKey::ListGroups, 5), &filtered, at);
        assert!(
            ListGroupsResponse::decode(&mut none.unwrap(), 5)
                .unwrap()
                .groups
                .is_empty()
        );
        let describe = DescribeGroupsRequest::default()
            .with_groups(vec![group_id("billing"), group_id("nobody")]);
        let described = send(&mut a, &mut log, (ApiKey::DescribeGroups, 5), &describe, at);
        let described = DescribeGroupsResponse::decode(&mut described.unwrap(), 5).unwrap();
        let billing = &described.groups[0];
        assert_eq!(
            (billing.group_state.as_str(), billing.protocol_data.as_str()),
            ("Stable", "range")
        );
        let mut members: Vec<(&str, &str, &[u8])> = billing
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.as_str(),
                    m.client_id.as_str(),
                    &m.member_assignment[..],
                )
            })
            .collect();
        members.sort();
        let mut expected = vec![
            (a_id.as_str(), "embarcadero", &b"orders"[..]),
            (b_id.as_str(), "embarcadero", &b"-"[..]),
        ];
        expected.sort();
        assert_eq!(members, expected);
        assert_eq!(described.groups[1].group_state.as_str(), "Dead");
        // The members commit and heartbeat in their generation.
        let commit = |member: &str, generation: i32| {
            OffsetCommitRequest::default()
                .with_group_id(GroupId(StrBytes::from_static_str("billing")))
                .with_generation_id_or_member_epoch(generation)
                .with_member_id(StrBytes::from_string(member.into()))
                .with_topics(vec![
                    OffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("orders")))
                        .with_partitions(vec![
                            OffsetCommitRequestPartition::default().with_committed_offset(7),
                        ]),
                ])
        };
        for (member, generation, code) in [
            (&a_id, 1, 0),
            (&a_id, 0, error_code::ILLEGAL_GENERATION),
            (&"stranger".to_owned(), 1, error_code::UNKNOWN_MEMBER_ID),
        ] {
            let body = send(
                &mut a,
                &mut log,
                (ApiKey::OffsetCommit, 8),
                &commit(member, generation),
                at,
            );
            let response = OffsetCommitResponse::decode(&mut body.unwrap(), 8).unwrap();
            assert_eq!(
                response.topics[0].partitions[0].error_code, code,
                "{member} {generation}"
            );
        }
        assert_eq!(
            log.committed("billing", "orders", 0).map(|c| c.offset),
            Some(7)
        );
        let beat = |member: &str| {
            HeartbeatRequest::default()
                .with_group_id(GroupId(StrBytes::from_static_str("billing")))
                .with_generation_id(1)
                .with_member_id(StrBytes::from_string(member.into()))
        };
        let heartbeat = |session: &mut KafkaSession, log: &mut FakeLog, member: &str| {
            let body = send(session, log, (ApiKey::Heartbeat, 4), &beat(member), at).unwrap();
            HeartbeatResponse::decode(&mut body.clone(), 4)
                .unwrap()
                .error_code
        };
        assert_eq!(heartbeat(&mut b, &mut log, &b_id), 0);
        // a leaves (version 3 names members); b is told to join again.
        let leave = LeaveGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("billing")))
            .with_members(vec![
                MemberIdentity::default().with_member_id(StrBytes::from_string(a_id.clone())),
                MemberIdentity::default().with_member_id(StrBytes::from_static_str("stranger")),
            ]);
        let left = send(&mut a, &mut log, (ApiKey::LeaveGroup, 3), &leave, at).unwrap();
        let left = LeaveGroupResponse::decode(&mut left.clone(), 3).unwrap();
        let codes: Vec<i16> = left.members.iter().map(|m| m.error_code).collect();
        assert_eq!(codes, vec![0, error_code::UNKNOWN_MEMBER_ID]);
        assert_eq!(
            heartbeat(&mut b, &mut log, &b_id),
            error_code::REBALANCE_IN_PROGRESS
        );
        // Once broker 1 is alive it coordinates: this broker sends members there.
        log.peers.push(KafkaNode {
            id: 1,
            host: "10.0.0.5".into(),
            port: 9092,
        });
        assert_eq!(
            heartbeat(&mut b, &mut log, &b_id),
            error_code::NOT_COORDINATOR
        );
        let refused = joined(
            send(&mut b, &mut log, join, &join_request(&b_id), at).unwrap(),
            5,
        );
        assert_eq!(refused.error_code, error_code::NOT_COORDINATOR);
    }
}
