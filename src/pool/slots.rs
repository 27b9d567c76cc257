//! The server-connection slots of one database, shared by all of its pools: each pool's idle
//! list and FIFO queue of waiters, and the fair sharing of the database's slots
//! (`max_db_connections`) between tenants. Pure and synchronous (generic over the connection
//! type, so it is unit tested without sockets); the caller never holds the lock across an
//! `.await`, and closes the connections handed back to it outside the lock.
//!
//! The rules, applied whenever a slot or a connection becomes free:
//! - within a pool, first come first served; a newcomer never overtakes a queued client;
//! - a tenant below its guaranteed minimum (`min_server_conn`) that has clients waiting gets the
//!   next slot, and its slots are not taken from it while it has clients waiting;
//! - beyond the minimums, slots are shared in proportion to `weight`: when a tenant over its
//!   share releases a connection while a tenant under its share waits, the connection is
//!   closed and its slot given to the waiting tenant (a connection is logged in as one role,
//!   so slots move between pools, connections do not);
//! - an idle connection does not sit while another pool of the database waits for a slot: its
//!   slot moves at once within a tenant, to a tenant below its minimum or holding nothing, or
//!   to one under its share relative to the idle connection's tenant; otherwise it is kept for
//!   its own tenant's next client, and the maintenance tick moves it once it has been idle for
//!   a whole tick (`hand_over_idle`);
//! - a tenant at its `max_server_conn` moves slots between its own pools the same way.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::grants::{GrantLog, How};

/// What a queued waiter receives.
#[derive(Debug)]
pub enum Grant<T> {
    /// A ready connection.
    Conn(T),
    /// Permission to open a new connection (a slot is reserved for it).
    Slot,
}

/// What a checkout may do right now.
#[derive(Debug)]
pub enum Take<T> {
    /// An idle connection to use.
    Idle(T),
    /// A slot was reserved: open a connection.
    Connect,
    /// A slot was taken over from an idle connection of another pool: close that connection
    /// (outside the lock), then open one.
    Replace(T),
    /// Everything is busy: queue up.
    Wait,
}

/// Why a client may not queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// The tenant's `max_queue`.
    pub max_queue: u32,
}

#[derive(Debug)]
struct Waiter<T> {
    id: u64,
    since: Instant,
    tx: oneshot::Sender<Grant<T>>,
}

/// One pool's part of the database's slots.
#[derive(Debug)]
struct PoolSlots<T> {
    tenant: usize,
    idle: Vec<T>,
    /// Slots held: connections logged in (idle or busy) plus connections being opened.
    open: u32,
    connecting: u32,
    waiters: VecDeque<Waiter<T>>,
    size: u32,
    reserve: u32,
    /// A client waited `reserve_pool_timeout`: the pool may grow by `reserve` until its queue
    /// is empty again.
    reserve_open: bool,
    high_water: u32,
    paused: bool,
}

impl<T> PoolSlots<T> {
    fn limit(&self) -> u32 {
        if self.reserve_open {
            self.size.saturating_add(self.reserve)
        } else {
            self.size
        }
    }
}

/// A tenant's share of this database's slots.
#[derive(Debug)]
struct TenantSlots {
    name: Arc<str>,
    min: u32,
    max: u32,
    weight: u32,
    /// Slots its pools hold.
    used: u32,
    /// Its clients queued on this database.
    waiting: u32,
    /// Its clients queued anywhere (shared across databases) and its `max_queue`.
    queue: Arc<super::tenant::TenantState>,
}

/// A tenant's share of a database and its load on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLoad {
    /// The tenant.
    pub name: String,
    /// Slots its pools hold.
    pub held: u32,
    /// Its clients queued on this database.
    pub waiting: u32,
    /// Slots guaranteed while it has clients waiting.
    pub min: u32,
    /// Its cap, if any.
    pub max: Option<u32>,
}

/// A tenant's share, as the slots see it.
#[derive(Debug, Clone)]
pub struct Share {
    /// Name.
    pub name: Arc<str>,
    /// Guaranteed slots.
    pub min: u32,
    /// Most slots (`u32::MAX`: none).
    pub max: u32,
    /// Weight.
    pub weight: u32,
}

/// The slots of one database.
#[derive(Debug)]
pub struct Slots<T> {
    capacity: u32,
    used: u32,
    pools: Vec<PoolSlots<T>>,
    tenants: Vec<TenantSlots>,
    next_waiter: u64,
    /// Grants recorded for inspection (off unless enabled).
    pub log: GrantLog,
}

impl<T> Slots<T> {
    /// Slots of a database with `capacity` slots (`u32::MAX`: no cap).
    pub fn new(capacity: u32) -> Self {
        Slots {
            capacity,
            used: 0,
            pools: Vec::new(),
            tenants: Vec::new(),
            next_waiter: 0,
            log: GrantLog::default(),
        }
    }

    /// Adds a pool of `tenant` (registered on first use); returns its index.
    pub fn add_pool(
        &mut self,
        tenant: Share,
        queue: Arc<super::tenant::TenantState>,
        size: u32,
        reserve: u32,
    ) -> usize {
        let t = match self.tenants.iter().position(|t| t.name == tenant.name) {
            Some(t) => t,
            None => {
                self.tenants.push(TenantSlots {
                    name: tenant.name,
                    min: tenant.min,
                    max: tenant.max,
                    weight: tenant.weight.max(1),
                    used: 0,
                    waiting: 0,
                    queue,
                });
                self.tenants.len() - 1
            }
        };
        self.pools.push(PoolSlots {
            tenant: t,
            idle: Vec::new(),
            open: 0,
            connecting: 0,
            waiters: VecDeque::new(),
            size,
            reserve,
            reserve_open: false,
            high_water: 0,
            paused: false,
        });
        self.pools.len() - 1
    }

    /// Takes an idle connection (most recently used first: its caches are warm), or reserves a
    /// slot, or takes over the slot of another pool's idle connection, or says to wait. Never
    /// jumps the queue: with waiters queued, a newcomer waits too.
    pub fn take(&mut self, p: usize) -> Take<T> {
        let Some(pool) = self.pools.get_mut(p) else {
            return Take::Wait;
        };
        if !pool.waiters.is_empty() || pool.paused {
            return Take::Wait;
        }
        if let Some(c) = pool.idle.pop() {
            self.record(p, How::Idle);
            return Take::Idle(c);
        }
        if self.may_grow(p) && self.used < self.capacity {
            self.reserve_slot(p);
            self.record(p, How::Slot);
            return Take::Connect;
        }
        // Full (the database, or the tenant's max_server_conn): take over an idle connection's
        // slot where the sharing rules allow.
        if !self.could_grow_with_a_moved_slot(p) {
            return Take::Wait;
        }
        match self.steal_idle(p, None) {
            Some(victim) => {
                self.reserve_slot(p);
                self.record(p, How::Moved);
                Take::Replace(victim)
            }
            None => Take::Wait,
        }
    }

    /// Whether pool `p` may hold one more slot as far as its own size and its tenant's cap
    /// go (the database's capacity aside).
    fn may_grow(&self, p: usize) -> bool {
        let Some(pool) = self.pools.get(p) else {
            return false;
        };
        let Some(t) = self.tenants.get(pool.tenant) else {
            return false;
        };
        !pool.paused && pool.open < pool.limit() && t.used < t.max
    }

    /// Whether pool `p` has a client waiting that a slot would serve.
    fn wants_slot(&self, p: usize) -> bool {
        self.pools.get(p).is_some_and(|pool| !pool.waiters.is_empty()) && self.may_grow(p)
    }

    /// Whether pool `p` could use a slot moved from some other pool: below its own size,
    /// not paused (its tenant's cap is checked per giver: a move within the tenant keeps it).
    fn could_grow_with_a_moved_slot(&self, p: usize) -> bool {
        self.pools
            .get(p)
            .is_some_and(|pool| !pool.paused && pool.open < pool.limit())
    }

    /// Whether pool `q` has clients waiting that a slot moved from pool `p` would serve: `q`
    /// can grow within its own size, and within its tenant's cap unless both pools belong to
    /// one tenant.
    fn could_take_from(&self, p: usize, q: usize) -> bool {
        self.pools.get(q).is_some_and(|x| !x.waiters.is_empty()) && self.may_take_from(p, q)
    }

    /// Whether pool `q` may hold a slot moved from pool `p` (waiters aside).
    fn may_take_from(&self, p: usize, q: usize) -> bool {
        let (Some(pp), Some(pq)) = (self.pools.get(p), self.pools.get(q)) else {
            return false;
        };
        q != p
            && self.could_grow_with_a_moved_slot(q)
            && (pq.tenant == pp.tenant || self.tenants.get(pq.tenant).is_some_and(|t| t.used < t.max))
    }

    fn reserve_slot(&mut self, p: usize) {
        self.used += 1;
        if let Some(pool) = self.pools.get_mut(p) {
            pool.open += 1;
            pool.connecting += 1;
            pool.high_water = pool.high_water.max(pool.open);
            if let Some(t) = self.tenants.get_mut(pool.tenant) {
                t.used += 1;
            }
        }
    }

    /// Gives up a slot of pool `p` (accounting only).
    fn release_slot(&mut self, p: usize) {
        self.used = self.used.saturating_sub(1);
        if let Some(pool) = self.pools.get_mut(p) {
            pool.open = pool.open.saturating_sub(1);
            if let Some(t) = self.tenants.get_mut(pool.tenant) {
                t.used = t.used.saturating_sub(1);
            }
        }
    }

    /// Takes an idle connection from another pool for pool `p` and gives up its slot: the
    /// one whose tenant is most over its share, among those the sharing rules let go (all of
    /// them with `any`, for connections idle through a maintenance tick).
    fn steal_idle(&mut self, p: usize, idle_long: Option<&dyn Fn(&T) -> bool>) -> Option<T> {
        let taker = self.load(p);
        // With `idle_long`, the oldest connection idle long enough, whatever the shares.
        let pick = |x: &PoolSlots<T>| match idle_long {
            None => x.idle.len().checked_sub(1),
            Some(f) => x.idle.iter().position(f),
        };
        let victim = (0..self.pools.len())
            .filter(|&q| q != p && self.pools.get(q).is_some_and(|x| pick(x).is_some()))
            .filter(|&q| self.may_take_from(q, p))
            .filter(|&q| idle_long.is_some() || self.load(q).should_yield_idle_to(&taker))
            .max_by(|&a, &b| self.load(a).cmp_load(&self.load(b)))?;
        let pool = self.pools.get_mut(victim)?;
        let i = pick(pool)?;
        let conn = pool.idle.remove(i);
        self.release_slot(victim);
        Some(conn)
    }

    /// Queues a waiter at the back of pool `p`'s queue, unless its tenant's queue is full.
    pub fn enqueue(&mut self, p: usize) -> Result<(u64, oneshot::Receiver<Grant<T>>), QueueFull> {
        let Some(pool) = self.pools.get_mut(p) else {
            return Err(QueueFull { max_queue: 0 });
        };
        let Some(t) = self.tenants.get_mut(pool.tenant) else {
            return Err(QueueFull { max_queue: 0 });
        };
        t.queue.try_enqueue()?;
        t.waiting += 1;
        let (tx, rx) = oneshot::channel();
        let id = self.next_waiter;
        self.next_waiter += 1;
        pool.waiters.push_back(Waiter {
            id,
            since: Instant::now(),
            tx,
        });
        self.record(p, How::Queued);
        Ok((id, rx))
    }

    /// Pops the first waiter of pool `p`, keeping the counts right.
    fn pop_waiter(&mut self, p: usize) -> Option<Waiter<T>> {
        let pool = self.pools.get_mut(p)?;
        let w = pool.waiters.pop_front()?;
        if pool.waiters.is_empty() {
            pool.reserve_open = false;
        }
        if let Some(t) = self.tenants.get_mut(pool.tenant) {
            t.waiting = t.waiting.saturating_sub(1);
            t.queue.dequeued();
        }
        Some(w)
    }

    /// Removes a waiter that gave up; false if it was already served.
    pub fn remove_waiter(&mut self, p: usize, id: u64) -> bool {
        let Some(pool) = self.pools.get_mut(p) else {
            return false;
        };
        let Some(i) = pool.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        pool.waiters.remove(i);
        if pool.waiters.is_empty() {
            pool.reserve_open = false;
        }
        if let Some(t) = self.tenants.get_mut(pool.tenant) {
            t.waiting = t.waiting.saturating_sub(1);
            t.queue.dequeued();
        }
        self.record(p, How::Left);
        // The queue is shorter: a slot may now go elsewhere.
        self.grant_free_slots();
        true
    }

    /// A connection's slot is reused to open a replacement.
    pub fn reopening(&mut self, p: usize) {
        if let Some(pool) = self.pools.get_mut(p) {
            pool.connecting += 1;
        }
    }

    /// Reserves a slot for pool `p` to pre-warm a connection (`min_pool_size`), if one is
    /// free and nobody waits for it.
    pub fn reserve_for_warmup(&mut self, p: usize) -> bool {
        let free = self.used < self.capacity;
        let waiting_elsewhere = (0..self.pools.len()).any(|q| q != p && self.wants_slot(q));
        if free && !waiting_elsewhere && self.may_grow(p) {
            self.reserve_slot(p);
            return true;
        }
        false
    }

    /// A connection being opened is now logged in (its slot stays taken).
    pub fn connected(&mut self, p: usize) {
        if let Some(pool) = self.pools.get_mut(p) {
            pool.connecting = pool.connecting.saturating_sub(1);
        }
    }

    /// A clean connection comes back to pool `p`: to another pool's waiting tenant when the
    /// sharing rules say its slot should move (the connection is then returned, to be closed
    /// by the caller), else to the pool's first waiter, else to the idle list (or closed, when
    /// the pool is over its size and nobody waits).
    pub fn give_back(&mut self, p: usize, mut conn: T) -> Option<T> {
        let Some(pool) = self.pools.get(p) else {
            return Some(conn);
        };
        if pool.paused {
            if let Some(pool) = self.pools.get_mut(p) {
                pool.idle.push(conn);
            }
            return None;
        }
        if let Some(q) = self.rebalance_target(p) {
            self.release_slot(p);
            self.grant_slot(q, How::Moved);
            // The grant may have failed (its waiter just left): the slot is free for others.
            self.grant_free_slots();
            return Some(conn);
        }
        while let Some(w) = self.pop_waiter(p) {
            self.record(p, How::Handoff);
            match w.tx.send(Grant::Conn(conn)) {
                Ok(()) => return None,
                Err(Grant::Conn(c)) => conn = c,
                Err(Grant::Slot) => return None,
            }
        }
        let over_size = self.pools.get(p).is_some_and(|pool| pool.open > pool.size);
        // Nobody of this pool waits: its slot goes where the sharing rules say it is needed
        // more than here (a connection idle through a maintenance tick goes to anyone waiting).
        let giver = self.load(p);
        let wanted_elsewhere = (0..self.pools.len())
            .any(|q| self.could_take_from(p, q) && giver.should_yield_idle_to(&self.load(q)));
        if over_size || wanted_elsewhere {
            self.release_slot(p);
            if wanted_elsewhere {
                if let Some(q) = (0..self.pools.len())
                    .filter(|&q| self.could_take_from(p, q))
                    .min_by(|&a, &b| self.load(a).cmp_need(&self.load(b)))
                {
                    self.grant_slot(q, How::Moved);
                }
            }
            self.grant_free_slots();
            return Some(conn);
        }
        if let Some(pool) = self.pools.get_mut(p) {
            pool.idle.push(conn);
        }
        None
    }

    /// Another pool that should get the slot of a connection pool `p` releases while `p`
    /// itself has clients waiting: only when the database is full, and only to a tenant under
    /// its share (with a margin of one connection, so slots do not ping-pong).
    fn rebalance_target(&self, p: usize) -> Option<usize> {
        let pool = self.pools.get(p)?;
        let tenant_full = self.tenants.get(pool.tenant).is_some_and(|t| t.used >= t.max);
        if (self.used < self.capacity && !tenant_full) || pool.waiters.is_empty() {
            return None;
        }
        let giver = self.load(p);
        (0..self.pools.len())
            .filter(|&q| self.could_take_from(p, q))
            .filter(|&q| giver.should_yield_to(&self.load(q), self.pools.get(q).map_or(0, |x| x.open)))
            .min_by(|&a, &b| self.load(a).cmp_need(&self.load(b)))
    }

    /// The sharing state of pool `p`'s tenant, for comparisons.
    fn load(&self, p: usize) -> Load {
        let pool = self.pools.get(p);
        let t = pool.and_then(|x| self.tenants.get(x.tenant));
        Load {
            tenant: pool.map_or(usize::MAX, |x| x.tenant),
            used: t.map_or(0, |t| t.used),
            min: t.map_or(0, |t| t.min),
            weight: t.map_or(1, |t| t.weight.max(1)),
            pool_open: pool.map_or(0, |x| x.open),
            oldest: pool.and_then(|x| x.waiters.front()).map_or(u64::MAX, |w| w.id),
        }
    }

    /// Hands a reserved slot to pool `q`'s first waiter; false if it had none left.
    fn grant_slot(&mut self, q: usize, how: How) -> bool {
        while let Some(w) = self.pop_waiter(q) {
            self.reserve_slot(q);
            self.record(q, how);
            if w.tx.send(Grant::Slot).is_ok() {
                return true;
            }
            self.release_slot(q);
            if let Some(pool) = self.pools.get_mut(q) {
                pool.connecting = pool.connecting.saturating_sub(1);
            }
        }
        false
    }

    /// Gives free slots to waiting pools: tenants below their minimum first, then the tenant
    /// furthest below its weighted share, oldest waiter first.
    fn grant_free_slots(&mut self) {
        while self.used < self.capacity {
            let Some(q) = (0..self.pools.len())
                .filter(|&q| self.wants_slot(q))
                .min_by(|&a, &b| self.load(a).cmp_need(&self.load(b)))
            else {
                return;
            };
            self.grant_slot(q, How::Slot);
        }
    }

    /// A connection of pool `p` was closed, or an attempt to open one failed
    /// (`was_connecting`): its slot is free and goes to whoever needs it most.
    pub fn slot_freed(&mut self, p: usize, was_connecting: bool) {
        if was_connecting {
            if let Some(pool) = self.pools.get_mut(p) {
                pool.connecting = pool.connecting.saturating_sub(1);
            }
        }
        self.release_slot(p);
        self.grant_free_slots();
    }

    /// Pool `p`'s first client has waited `reserve_pool_timeout` (`since` at most): the pool
    /// may grow by its reserve while clients wait. Returns idle connections of other pools
    /// whose slots were taken over (to close).
    pub fn open_reserve(&mut self, p: usize, since: Instant) -> Vec<T> {
        let Some(pool) = self.pools.get_mut(p) else {
            return Vec::new();
        };
        if pool.reserve == 0 || pool.waiters.front().is_none_or(|w| w.since > since) {
            return Vec::new();
        }
        pool.reserve_open = true;
        self.grant_free_slots();
        self.hand_over_idle(None)
    }

    /// Gives the slots of idle connections to pools whose clients wait for one, neediest
    /// first (the connections are returned, to be closed). By the sharing rules; or, with
    /// `idle_long`, any connection it accepts (the maintenance tick passes "idle for a whole
    /// tick"), so a quiet tenant's connections do not sit while others wait.
    pub fn hand_over_idle(&mut self, idle_long: Option<&dyn Fn(&T) -> bool>) -> Vec<T> {
        let mut victims = Vec::new();
        'moves: for _ in 0..self.pools.len().saturating_mul(4) {
            let mut candidates: Vec<usize> = (0..self.pools.len())
                .filter(|&q| {
                    self.pools.get(q).is_some_and(|x| !x.waiters.is_empty())
                        && self.could_grow_with_a_moved_slot(q)
                })
                .collect();
            candidates.sort_by(|&a, &b| self.load(a).cmp_need(&self.load(b)));
            for q in candidates {
                if let Some(v) = self.steal_idle(q, idle_long) {
                    victims.push(v);
                    self.grant_slot(q, How::Moved);
                    self.grant_free_slots();
                    continue 'moves;
                }
            }
            break;
        }
        victims
    }

    /// Pauses or resumes handing out pool `p`'s connections. On resume, queued waiters get
    /// the idle connections, then free slots.
    pub fn set_paused(&mut self, p: usize, paused: bool) -> Vec<T> {
        self.set_paused_many(&[p], paused)
    }

    /// Pauses or resumes several pools at once: on resume, none of them is served before all
    /// are unpaused, so the free slots are shared by the rules rather than taken by the first.
    pub fn set_paused_many(&mut self, ps: &[usize], paused: bool) -> Vec<T> {
        for &p in ps {
            if let Some(pool) = self.pools.get_mut(p) {
                pool.paused = paused;
            }
        }
        if paused {
            return Vec::new();
        }
        let mut closed = Vec::new();
        for &p in ps {
            let idle = self
                .pools
                .get_mut(p)
                .map(|x| std::mem::take(&mut x.idle))
                .unwrap_or_default();
            for conn in idle {
                closed.extend(self.give_back(p, conn));
            }
        }
        self.grant_free_slots();
        closed.extend(self.hand_over_idle(None));
        closed
    }

    /// Whether pool `p` is paused.
    pub fn paused(&self, p: usize) -> bool {
        self.pools.get(p).is_some_and(|x| x.paused)
    }

    /// Takes out pool `p`'s idle connections that `reject` picks (to close them).
    pub fn take_idle_where(&mut self, p: usize, mut reject: impl FnMut(&T) -> bool) -> Vec<T> {
        let Some(pool) = self.pools.get_mut(p) else {
            return Vec::new();
        };
        let (rejected, kept): (Vec<T>, Vec<T>) = std::mem::take(&mut pool.idle)
            .into_iter()
            .partition(|c| reject(c));
        pool.idle = kept;
        rejected
    }

    /// Takes every idle connection of pool `p` out (to close them).
    pub fn drain_idle(&mut self, p: usize) -> Vec<T> {
        self.pools
            .get_mut(p)
            .map(|x| std::mem::take(&mut x.idle))
            .unwrap_or_default()
    }

    /// Counts of pool `p` for SHOW POOLS and gauges.
    pub fn counts(&self, p: usize) -> Counts {
        let Some(pool) = self.pools.get(p) else {
            return Counts::default();
        };
        let idle = u32::try_from(pool.idle.len()).unwrap_or(u32::MAX);
        Counts {
            idle,
            connecting: pool.connecting,
            active: pool.open.saturating_sub(idle).saturating_sub(pool.connecting),
            waiting: u32::try_from(pool.waiters.len()).unwrap_or(u32::MAX),
            high_water: pool.high_water,
            max_size: pool.size,
            oldest_wait: pool.waiters.front().map(|w| w.since),
        }
    }

    /// Slots in use across the database.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// Every tenant's share of this database and its load on it, for metrics.
    pub fn tenant_shares(&self) -> Vec<TenantLoad> {
        self.tenants
            .iter()
            .map(|t| TenantLoad {
                name: t.name.to_string(),
                held: t.used,
                waiting: t.waiting,
                min: t.min,
                max: (t.max != u32::MAX).then_some(t.max),
            })
            .collect()
    }

    /// Every tenant's load on this database: (name, slots held, clients waiting).
    pub fn tenant_loads(&self) -> Vec<(Arc<str>, u32, u32)> {
        self.tenants
            .iter()
            .map(|t| (t.name.clone(), t.used, t.waiting))
            .collect()
    }

    fn record(&mut self, p: usize, how: How) {
        if !self.log.enabled() {
            return;
        }
        let Some(tenant) = self.pools.get(p).and_then(|x| self.tenants.get(x.tenant)) else {
            return;
        };
        let name = tenant.name.clone();
        let loads = self.tenant_loads();
        self.log.push(name, p, how, loads);
    }
}

/// A tenant's position relative to its share, for one pool.
#[derive(Debug, Clone, Copy)]
struct Load {
    tenant: usize,
    used: u32,
    min: u32,
    weight: u32,
    pool_open: u32,
    oldest: u64,
}

impl Load {
    fn below_min(&self) -> bool {
        self.used < self.min
    }

    /// Slots above the minimum per unit of weight, compared without division:
    /// `self.excess / self.weight` vs `other.excess / other.weight`.
    fn cmp_excess(&self, other: &Load) -> std::cmp::Ordering {
        let a = (i64::from(self.used) - i64::from(self.min)) * i64::from(other.weight);
        let b = (i64::from(other.used) - i64::from(other.min)) * i64::from(self.weight);
        a.cmp(&b)
    }

    /// Which of two waiting pools needs a slot more (Less: `self`): below-minimum tenants
    /// first, then the least share used, then the oldest waiter.
    fn cmp_need(&self, other: &Load) -> std::cmp::Ordering {
        other
            .below_min()
            .cmp(&self.below_min())
            .then_with(|| self.cmp_excess(other))
            .then_with(|| self.oldest.cmp(&other.oldest))
    }

    /// Which of two pools holding idle connections is more over its share (Greater: `self`).
    fn cmp_load(&self, other: &Load) -> std::cmp::Ordering {
        self.below_min()
            .cmp(&other.below_min())
            .reverse()
            .then_with(|| self.cmp_excess(other))
    }

    /// Whether this pool's idle connection (nobody of its pool waits) should give its slot to
    /// `taker`'s waiting clients: always within one tenant; across tenants when the taker is
    /// below its minimum or holds nothing at all or, after the move, still at or below this tenant's share per weight
    /// (so a tenant at its share keeps an idle connection for its next client instead of
    /// closing and reopening one at every lull).
    fn should_yield_idle_to(&self, taker: &Load) -> bool {
        if self.tenant == taker.tenant || taker.below_min() || taker.used == 0 {
            return true;
        }
        let a = (i64::from(taker.used) + 1 - i64::from(taker.min)) * i64::from(self.weight);
        let b = (i64::from(self.used) - 1 - i64::from(self.min)) * i64::from(taker.weight);
        a <= b
    }

    /// Whether this pool (with clients of its own waiting) should give the slot of a
    /// connection it releases to `taker`, whose pool holds `taker_open` connections.
    fn should_yield_to(&self, taker: &Load, taker_open: u32) -> bool {
        if self.tenant == taker.tenant {
            // Pools of one tenant share its slots evenly, within one connection.
            return taker_open + 1 < self.pool_open;
        }
        // A tenant at or below its minimum keeps its slots while it has clients waiting.
        if self.used <= self.min {
            return false;
        }
        // Below its minimum, or holding nothing at all (however small its share): a tenant
        // with clients waiting is never starved by the weights' rounding.
        if taker.below_min() || taker.used == 0 {
            return true;
        }
        // After the move the taker must still be at or below the giver (per weight).
        let a = (i64::from(taker.used) + 1 - i64::from(taker.min)) * i64::from(self.weight);
        let b = (i64::from(self.used) - 1 - i64::from(self.min)) * i64::from(taker.weight);
        a <= b
    }
}

/// A snapshot of a pool's connection counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Logged in, in the idle list.
    pub idle: u32,
    /// Being opened.
    pub connecting: u32,
    /// Serving a client.
    pub active: u32,
    /// Clients queued for a connection.
    pub waiting: u32,
    /// Most slots ever in use at once.
    pub high_water: u32,
    /// Pool size.
    pub max_size: u32,
    /// Since when the longest-waiting client waits, if any waits.
    pub oldest_wait: Option<Instant>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::tenant::TenantState;
    use super::*;

    fn share(name: &str, min: u32, weight: u32) -> Share {
        Share {
            name: name.into(),
            min,
            max: u32::MAX,
            weight,
        }
    }

    fn pool(s: &mut Slots<u32>, name: &str, min: u32, weight: u32, size: u32) -> usize {
        s.add_pool(
            share(name, min, weight),
            Arc::new(TenantState::new(None)),
            size,
            0,
        )
    }

    fn connect(s: &mut Slots<u32>, p: usize) {
        assert!(matches!(s.take(p), Take::Connect));
        s.connected(p);
    }

    #[test]
    fn fills_up_then_queues_fifo() {
        let mut s = Slots::<u32>::new(u32::MAX);
        let p = pool(&mut s, "t", 0, 1, 2);
        connect(&mut s, p);
        connect(&mut s, p);
        assert!(matches!(s.take(p), Take::Wait));
        let (_, mut r1) = s.enqueue(p).unwrap();
        let (_, mut r2) = s.enqueue(p).unwrap();
        assert!(s.give_back(p, 7).is_none());
        assert!(matches!(r1.try_recv().unwrap(), Grant::Conn(7)));
        assert!(r2.try_recv().is_err());
        // A newcomer must not overtake the queued waiter.
        assert!(matches!(s.take(p), Take::Wait));
        assert!(s.give_back(p, 8).is_none());
        assert!(matches!(r2.try_recv().unwrap(), Grant::Conn(8)));
        assert_eq!(s.counts(p).high_water, 2);
    }

    #[test]
    fn paused_pool_queues_everyone_and_resume_serves_them() {
        let mut s = Slots::<u32>::new(u32::MAX);
        let p = pool(&mut s, "t", 0, 1, 2);
        connect(&mut s, p);
        s.set_paused(p, true);
        assert!(matches!(s.take(p), Take::Wait));
        let (_, mut r1) = s.enqueue(p).unwrap();
        let (_, mut r2) = s.enqueue(p).unwrap();
        assert!(s.give_back(p, 1).is_none());
        assert!(r1.try_recv().is_err(), "nothing handed out while paused");
        assert_eq!(s.counts(p).idle, 1);
        assert!(s.set_paused(p, false).is_empty());
        assert!(matches!(r1.try_recv().unwrap(), Grant::Conn(1)));
        assert!(matches!(r2.try_recv().unwrap(), Grant::Slot));
    }

    #[test]
    fn freed_slot_goes_to_waiter_and_skips_gone_ones() {
        let mut s = Slots::<u32>::new(u32::MAX);
        let p = pool(&mut s, "t", 0, 1, 1);
        assert!(matches!(s.take(p), Take::Connect));
        let (id1, r1) = s.enqueue(p).unwrap();
        let (_, mut r2) = s.enqueue(p).unwrap();
        drop(r1);
        s.slot_freed(p, true);
        assert!(matches!(r2.try_recv().unwrap(), Grant::Slot));
        assert_eq!(s.counts(p).connecting, 1);
        assert!(!s.remove_waiter(p, id1));
        s.connected(p);
        assert!(s.give_back(p, 1).is_none());
        assert_eq!(
            s.counts(p),
            Counts {
                idle: 1,
                connecting: 0,
                active: 0,
                waiting: 0,
                high_water: 1,
                max_size: 1,
                oldest_wait: None,
            }
        );
    }

    #[test]
    fn database_capacity_caps_all_pools_and_idle_slots_move_to_waiters() {
        let mut s = Slots::<u32>::new(2);
        let a = pool(&mut s, "a", 0, 1, 5);
        let b = pool(&mut s, "b", 0, 1, 5);
        connect(&mut s, a);
        connect(&mut s, a);
        assert_eq!(s.used(), 2);
        // b finds no free slot and no idle connection: it waits.
        assert!(matches!(s.take(b), Take::Wait));
        let (_, mut rb) = s.enqueue(b).unwrap();
        // a's connection comes back with nobody of a's waiting: its slot goes to b.
        assert_eq!(s.give_back(a, 1), Some(1));
        assert!(matches!(rb.try_recv().unwrap(), Grant::Slot));
        s.connected(b);
        assert_eq!(s.used(), 2);
        // An idle connection of a is taken over by a newcomer of b.
        assert!(s.give_back(b, 2).is_none());
        assert_eq!(s.counts(b).idle, 1);
    }

    #[test]
    fn newcomer_takes_over_another_pools_idle_connection() {
        let mut s = Slots::<u32>::new(1);
        let a = pool(&mut s, "a", 0, 1, 5);
        let b = pool(&mut s, "b", 0, 1, 5);
        connect(&mut s, a);
        assert!(s.give_back(a, 1).is_none());
        assert!(matches!(s.take(b), Take::Replace(1)));
        assert_eq!(s.counts(a).idle + s.counts(a).active, 0);
        assert_eq!(s.counts(b).connecting, 1);
        assert_eq!(s.used(), 1);
    }

    #[test]
    fn tenant_below_minimum_gets_the_next_released_slot() {
        let mut s = Slots::<u32>::new(4);
        let w = pool(&mut s, "workers", 0, 1, 10);
        let api = pool(&mut s, "api", 2, 1, 10);
        for _ in 0..4 {
            connect(&mut s, w);
        }
        let (_, mut rw) = s.enqueue(w).unwrap();
        assert!(matches!(s.take(api), Take::Wait));
        let (_, mut ra1) = s.enqueue(api).unwrap();
        let (_, mut ra2) = s.enqueue(api).unwrap();
        // Workers release twice: both slots go to api (below its minimum of 2), although a
        // worker waited first.
        assert_eq!(s.give_back(w, 1), Some(1));
        assert!(matches!(ra1.try_recv().unwrap(), Grant::Slot));
        assert_eq!(s.give_back(w, 2), Some(2));
        assert!(matches!(ra2.try_recv().unwrap(), Grant::Slot));
        // The 2 slots above the minimums are shared 1:1: one more moves to api (3 vs 1), then
        // the next release stays with workers.
        let (_, mut ra3) = s.enqueue(api).unwrap();
        assert_eq!(s.give_back(w, 3), Some(3));
        assert!(matches!(ra3.try_recv().unwrap(), Grant::Slot));
        let (_, mut ra4) = s.enqueue(api).unwrap();
        assert!(s.give_back(w, 4).is_none());
        assert!(matches!(rw.try_recv().unwrap(), Grant::Conn(4)));
        assert!(ra4.try_recv().is_err());
    }

    #[test]
    fn weights_share_the_slots_above_the_minimums() {
        // capacity 8, weights 3:1, no minimums: shares 6 and 2.
        let mut s = Slots::<u32>::new(8);
        let heavy = pool(&mut s, "heavy", 0, 3, 10);
        let light = pool(&mut s, "light", 0, 1, 10);
        for _ in 0..8 {
            connect(&mut s, light);
        }
        let mut heavy_rx = Vec::new();
        for _ in 0..10 {
            heavy_rx.push(s.enqueue(heavy).unwrap().1);
        }
        let mut light_rx = Vec::new();
        for _ in 0..10 {
            light_rx.push(s.enqueue(light).unwrap().1);
        }
        // Light releases its connections one by one; slots move to heavy until the shares hold.
        let mut moved = 0;
        for i in 0..8 {
            if s.give_back(light, i).is_some() {
                moved += 1;
                s.connected(heavy);
            }
        }
        assert_eq!(moved, 6, "{:?}", s.tenant_loads());
        let loads = s.tenant_loads();
        assert_eq!(loads[0].1, 6);
        assert_eq!(loads[1].1, 2);
    }

    #[test]
    fn pools_of_a_tenant_at_its_max_share_its_slots() {
        let mut s = Slots::<u32>::new(u32::MAX);
        let t = Share {
            name: "t".into(),
            min: 0,
            max: 2,
            weight: 1,
        };
        let x = s.add_pool(t.clone(), Arc::new(TenantState::new(None)), 5, 0);
        let y = s.add_pool(t, Arc::new(TenantState::new(None)), 5, 0);
        connect(&mut s, x);
        connect(&mut s, x);
        assert!(s.give_back(x, 1).is_none());
        assert!(s.give_back(x, 2).is_none());
        // The tenant is at its max with both connections idle in x: y takes one over.
        assert!(matches!(s.take(y), Take::Replace(_)));
        s.connected(y);
        // Under load: x's clients queue, and so do y's; x releasing with its own waiters
        // still gives y its even share.
        let _x1 = s.enqueue(x).unwrap();
        assert!(matches!(s.take(x), Take::Wait));
        let (_, mut y1) = s.enqueue(y).unwrap();
        let (_, mut y2) = s.enqueue(y).unwrap();
        assert!(
            s.give_back(y, 3).is_none(),
            "y has waiters and holds no more than x"
        );
        assert!(matches!(y1.try_recv().unwrap(), Grant::Conn(3)));
        assert!(y2.try_recv().is_err());
        assert_eq!(
            (s.counts(x).idle + s.counts(x).active, s.counts(y).active),
            (1, 1)
        );
    }

    #[test]
    fn a_tenant_at_its_share_keeps_an_idle_connection_until_the_maintenance_tick() {
        // capacity 2, equal weights: each tenant's share is 1.
        let mut s = Slots::<u32>::new(2);
        let a = pool(&mut s, "a", 0, 1, 5);
        let b = pool(&mut s, "b", 0, 1, 5);
        connect(&mut s, a);
        connect(&mut s, b);
        let (_, mut rb) = s.enqueue(b).unwrap();
        // a's connection comes back with nobody of a's waiting. b already holds its share:
        // a keeps the connection for its next client instead of closing it at once.
        assert!(s.give_back(a, 1).is_none());
        assert!(rb.try_recv().is_err());
        // Still idle at the maintenance tick: its slot goes to b.
        assert_eq!(s.hand_over_idle(Some(&|_: &u32| true)), vec![1]);
        assert!(matches!(rb.try_recv().unwrap(), Grant::Slot));
        assert_eq!(s.used(), 2);
    }

    #[test]
    fn a_tenant_holding_nothing_is_not_starved_by_small_weights() {
        // capacity 3, weights 3:1: light's share rounds to 0, yet it gets a slot.
        let mut s = Slots::<u32>::new(3);
        let heavy = pool(&mut s, "heavy", 0, 3, 5);
        let light = pool(&mut s, "light", 0, 1, 5);
        for _ in 0..3 {
            connect(&mut s, heavy);
        }
        let _h = s.enqueue(heavy).unwrap();
        let (_, mut l) = s.enqueue(light).unwrap();
        assert_eq!(s.give_back(heavy, 1), Some(1));
        assert!(matches!(l.try_recv().unwrap(), Grant::Slot));
    }

    #[test]
    fn the_tick_skips_a_capped_tenant_and_serves_the_next() {
        // capacity 4: t1 (max 1) holds its 1 and waits; t2 holds 1 busy and waits; t3 holds 2
        // idle. The neediest, t1, can take nothing; t2 must still get t3's idle connections.
        let mut s = Slots::<u32>::new(4);
        let capped = Share {
            name: "t1".into(),
            min: 0,
            max: 1,
            weight: 1,
        };
        let t1 = s.add_pool(capped, Arc::new(TenantState::new(None)), 5, 0);
        let t2 = pool(&mut s, "t2", 0, 1, 5);
        let t3 = pool(&mut s, "t3", 0, 1, 5);
        connect(&mut s, t1);
        connect(&mut s, t2);
        connect(&mut s, t3);
        connect(&mut s, t3);
        assert!(s.give_back(t3, 30).is_none());
        assert!(s.give_back(t3, 31).is_none());
        let _w1 = s.enqueue(t1).unwrap();
        let (_, mut w2) = s.enqueue(t2).unwrap();
        let moved = s.hand_over_idle(Some(&|_: &u32| true));
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert!(matches!(w2.try_recv().unwrap(), Grant::Slot));
    }

    #[test]
    fn pools_resumed_together_share_the_free_slots() {
        let mut s = Slots::<u32>::new(2);
        let a = pool(&mut s, "a", 0, 1, 5);
        let b = pool(&mut s, "b", 0, 1, 5);
        s.set_paused_many(&[a, b], true);
        let (_, mut a1) = s.enqueue(a).unwrap();
        let (_, mut a2) = s.enqueue(a).unwrap();
        let (_, mut b1) = s.enqueue(b).unwrap();
        assert!(s.set_paused_many(&[a, b], false).is_empty());
        assert!(matches!(a1.try_recv().unwrap(), Grant::Slot));
        assert!(matches!(b1.try_recv().unwrap(), Grant::Slot), "not both to a");
        assert!(a2.try_recv().is_err());
    }

    #[test]
    fn max_queue_refuses_the_next_waiter() {
        let mut s = Slots::<u32>::new(u32::MAX);
        let q = Arc::new(TenantState::new(Some(1)));
        let p = s.add_pool(share("t", 0, 1), q.clone(), 1, 0);
        connect(&mut s, p);
        let (id, _r) = s.enqueue(p).unwrap();
        assert_eq!(s.enqueue(p).unwrap_err(), QueueFull { max_queue: 1 });
        assert!(s.remove_waiter(p, id));
        assert!(s.enqueue(p).is_ok());
    }

    #[test]
    fn reserve_opens_after_a_long_wait_and_closes_with_the_queue() {
        let mut s = Slots::<u32>::new(u32::MAX);
        let p = s.add_pool(share("t", 0, 1), Arc::new(TenantState::new(None)), 1, 1);
        connect(&mut s, p);
        let (_, mut r) = s.enqueue(p).unwrap();
        s.open_reserve(p, Instant::now());
        assert!(matches!(r.try_recv().unwrap(), Grant::Slot));
        s.connected(p);
        // Nobody waits: a connection over the pool size is closed on return.
        assert_eq!(s.give_back(p, 1), Some(1));
        assert!(s.give_back(p, 2).is_none());
    }
}
