//! How many clients may be pinned to their server connections at once (transaction mode): a
//! pool's `max_pinned` and its tenant's. A pinned connection cannot be lent to anyone else,
//! so without a bound one pool or tenant could hold every slot it may use as session-mode
//! connections. A client takes its place before running a statement that may pin (so that
//! statement, not a later one, is refused) and keeps it while pinned.

use std::sync::Arc;

use super::tenant::{Capped, Ticket};
use crate::proto::backend::{PgError, Severity};
use crate::proto::sqlstate;

/// The caps a pool's clients are counted against.
#[derive(Debug, Clone)]
pub struct PinBudget {
    pool: Arc<Capped>,
    tenant: Arc<Capped>,
    /// "db/user", for the refusal.
    pool_name: Arc<str>,
    tenant_name: Arc<str>,
}

impl Default for PinBudget {
    /// No caps.
    fn default() -> Self {
        PinBudget {
            pool: Arc::new(Capped::new(None)),
            tenant: Arc::new(Capped::new(None)),
            pool_name: Arc::from(""),
            tenant_name: Arc::from(""),
        }
    }
}

/// One client's place in both counts, given back on drop.
#[derive(Debug)]
pub struct PinSlot {
    _pool: Ticket,
    _tenant: Ticket,
}

/// A cap that is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinLimit {
    /// The pool's `max_pinned`.
    Pool { cap: u32, pool: Arc<str> },
    /// The tenant's `max_pinned`.
    Tenant { cap: u32, tenant: Arc<str> },
}

impl PinBudget {
    /// Pool `pool_name` capped at `max_pinned`, in a tenant whose count is `tenant`.
    pub fn new(
        max_pinned: Option<u32>,
        pool_name: &str,
        tenant: Arc<Capped>,
        tenant_name: &str,
    ) -> PinBudget {
        PinBudget {
            pool: Arc::new(Capped::new(max_pinned)),
            tenant,
            pool_name: Arc::from(pool_name),
            tenant_name: Arc::from(tenant_name),
        }
    }

    /// A place for one more pinned client, unless a cap is reached.
    pub fn try_take(&self) -> Result<PinSlot, PinLimit> {
        let pool = Ticket::take(&self.pool).map_err(|cap| PinLimit::Pool {
            cap,
            pool: self.pool_name.clone(),
        })?;
        let tenant = Ticket::take(&self.tenant).map_err(|cap| PinLimit::Tenant {
            cap,
            tenant: self.tenant_name.clone(),
        })?;
        Ok(PinSlot {
            _pool: pool,
            _tenant: tenant,
        })
    }

    /// A place for a client found pinned by what no statement announced (a text too long to
    /// read): counted even past the caps, so that the next statements that may pin are
    /// refused.
    pub fn take_anyway(&self) -> PinSlot {
        PinSlot {
            _pool: Ticket::force(&self.pool),
            _tenant: Ticket::force(&self.tenant),
        }
    }

    /// Clients counted in the pool now.
    pub fn pool_count(&self) -> u32 {
        self.pool.get()
    }
}

impl PinLimit {
    /// The error the statement that would pin gets (53300).
    pub fn to_pg_error(&self) -> PgError {
        PgError::new(Severity::Error, sqlstate::TOO_MANY_CONNECTIONS, self.message())
            .with_hint(PIN_LIMIT_HINT)
    }

    /// What is refused and why.
    pub fn message(&self) -> String {
        let whose = match self {
            PinLimit::Pool { cap, pool } => format!("pool {pool} already has {cap} (max_pinned = {cap})"),
            PinLimit::Tenant { cap, tenant } => {
                format!("tenant {tenant} already has {cap} (its max_pinned = {cap})")
            }
        };
        format!(
            "too many pinned clients: this statement would keep its server connection pinned to this client (session state such as a temporary table or a session advisory lock), and {whose}"
        )
    }
}

/// The hint that goes with a refusal.
pub const PIN_LIMIT_HINT: &str =
    "end the session state sooner (unlock, drop, close), or use a session-mode pool for this client";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_and_the_tenant_cap_pinned_clients() {
        let tenant = Arc::new(Capped::new(Some(3)));
        let a = PinBudget::new(Some(2), "db/a", tenant.clone(), "t");
        let b = PinBudget::new(None, "db/b", tenant.clone(), "t");
        let a1 = a.try_take();
        let a2 = a.try_take();
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(
            a.try_take().err(),
            Some(PinLimit::Pool {
                cap: 2,
                pool: Arc::from("db/a")
            })
        );
        let b1 = b.try_take();
        assert!(b1.is_ok());
        assert_eq!(
            b.try_take().err(),
            Some(PinLimit::Tenant {
                cap: 3,
                tenant: Arc::from("t")
            })
        );
        // A refusal by the tenant gives the pool's place back.
        assert_eq!(b.pool_count(), 1);
        drop(a1);
        assert!(b.try_take().is_ok());
        let forced = a.take_anyway();
        assert_eq!(a.pool_count(), 2);
        drop(forced);
        drop(a2);
        assert_eq!(a.pool_count(), 0);
        assert_eq!(tenant.get(), 1);
    }
}
