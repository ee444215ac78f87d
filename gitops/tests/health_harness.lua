-- Runs Argo CD health checks (health.lua) over test cases, the way Argo CD calls them: the
-- object as the global `obj`, the script's return value a table with `status` and `message`.
--   lua5.4 health_harness.lua CASES.lua     (CASES.lua is written by health_cases.py)
-- Argo CD embeds gopher-lua (Lua 5.1) and opens only its base, table, string and math
-- libraries: each script runs here in an environment that holds only what Lua 5.1 has of those,
-- so a script that calls something newer (utf8, table.unpack, math.tointeger, ...) or something
-- Argo CD does not offer (io, os, require, load) fails here too.
-- Prints one line per case and exits 1 if any case fails.

local casesFile = arg[1]
if casesFile == nil then
  io.stderr:write("usage: lua5.4 health_harness.lua CASES.lua\n")
  os.exit(2)
end
local cases = dofile(casesFile)

local statuses = {
  Healthy = true, Progressing = true, Degraded = true, Suspended = true, Missing = true, Unknown = true,
}

local function pick(from, names)
  local out = {}
  for _, name in ipairs(names) do
    out[name] = from[name]
  end
  return out
end

local function sandbox(obj)
  local env = pick(_G, {
    "assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget",
    "rawset", "select", "setmetatable", "tonumber", "tostring", "type", "xpcall",
  })
  env.string = pick(string, {
    "byte", "char", "find", "format", "gmatch", "gsub", "len", "lower", "match", "rep",
    "reverse", "sub", "upper",
  })
  env.table = pick(table, { "concat", "insert", "remove", "sort" })
  env.math = pick(math, {
    "abs", "acos", "asin", "atan", "ceil", "cos", "exp", "floor", "fmod", "huge", "log", "max",
    "min", "modf", "pi", "random", "randomseed", "sin", "sqrt", "tan",
  })
  env.obj = obj
  return env
end

local scripts = {}
local function load_script(path)
  if scripts[path] == nil then
    local file = assert(io.open(path, "r"))
    scripts[path] = file:read("a")
    file:close()
  end
  return scripts[path]
end

local failed = 0
for _, case in ipairs(cases) do
  local chunk, compileError = load(load_script(case.script), "@" .. case.script, "t", sandbox(case.obj))
  local ok, result
  if chunk == nil then
    ok, result = false, compileError
  else
    ok, result = pcall(chunk)
  end
  local problem = nil
  if not ok then
    problem = "the script failed: " .. tostring(result)
  elseif type(result) ~= "table" then
    problem = "the script returned " .. type(result) .. ", not a table"
  elseif not statuses[result.status] then
    problem = "status " .. tostring(result.status) .. " is not an Argo CD health status"
  elseif type(result.message) ~= "string" then
    problem = "message is " .. type(result.message) .. ", not a string"
  elseif result.status ~= case.status or result.message ~= case.message then
    problem = string.format("expected %s %q\n          got      %s %q", case.status, case.message,
      result.status, result.message)
  end
  if problem == nil then
    print(string.format("  ok    %s: %s", case.name, case.status))
  else
    failed = failed + 1
    print(string.format("  FAIL  %s: %s", case.name, problem))
  end
end
print(string.format("health checks: %d cases, %d failed", #cases, failed))
if failed > 0 or #cases == 0 then
  os.exit(1)
end
