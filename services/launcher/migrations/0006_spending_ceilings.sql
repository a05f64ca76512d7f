-- Spending ceilings set at run time (#18, `SetSpendingCeiling`): one row per period and
-- repository ('' = every repository), replacing the environment's ceiling (ORCH_BUDGET_*)
-- for it until deleted; usd '0' lifts it. Dollars as text, as usage-ledger keeps costs (the
-- same decimal on SQLite and PostgreSQL).
CREATE TABLE spending_ceilings (
    period TEXT NOT NULL,
    repo TEXT NOT NULL,
    usd TEXT NOT NULL,
    set_at_ms BIGINT NOT NULL,
    PRIMARY KEY (period, repo)
);
