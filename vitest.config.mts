import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['__test__/**/*.test.ts'],
    // Native addons and child processes: one forked process per file, not worker threads.
    pool: 'forks',
    testTimeout: 30_000,
  },
})
