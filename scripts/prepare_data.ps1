# Gathers a text corpus and turns it into the three files tb-train reads: OUT/tokenizer.json,
# OUT/train.bin and OUT/val.bin. Works offline from local text; URLs go through tb-fetch (the only
# tinybit command that touches the network). scripts/prepare_data.sh is the same script, line for
# line, for bash.
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Show-Usage {
  @'
Usage: [$env:VAR = 'value'; ...] pwsh scripts/prepare_data.ps1 [--dry-run] OUT_DIR [SOURCE...]

Gathers UTF-8 text from SOURCE files and directories (and from URLS) into OUT_DIR/corpus/, trains a
tokenizer on it, and encodes it into OUT_DIR/tokenizer.json, OUT_DIR/train.bin and OUT_DIR/val.bin.
Prints the three paths on stdout.

Options:
  --dry-run     print the commands it would run, run nothing
  --help        print this help

Environment:
  DATA_PROFILE     general (default) or coding: the local text used when no SOURCE or URL is named.
                   general: tests/data/tinyshakespeare.txt and the text files of /usr/share/doc;
                   coding: the Rust sources in the cargo registry ($CARGO_HOME/registry/src/*/*/src)
  SOURCES          more sources, separated by spaces (added after the SOURCE arguments)
  URLS             URLs fetched with tb-fetch (cached), separated by spaces
  TOTAL_TOKENS     cap on the corpus, approximately: TOTAL_TOKENS x BYTES_PER_TOKEN bytes are
                   gathered (default 100000000)
  BYTES_PER_TOKEN  bytes per token assumed by the cap (default 4, about right for English and code)
  TOKENIZER        use this tokenizer file instead of training one, e.g. "$(tb-fetch)"
  VOCAB_SIZE       size of the trained tokenizer, special tokens included (default 50304)
  VAL_FRACTION     fraction of the text that goes to val.bin (default 0.05)
  TB_BIN           directory holding tb-tok and tb-fetch (default target/release, else PATH)

Files that are not UTF-8 text (binary, NUL bytes, other encodings) and hidden files are skipped.
Files are taken in sorted order; the file that crosses the cap is cut after its last whole line.
Exit status: 0 done, 2 usage error, 65 no usable text, 66 a SOURCE does not exist, 69 tb-tok or
tb-fetch not found; a failing tb-tok or tb-fetch passes its own status on.
'@
}

function Stop-Script([int]$status, [string]$message) {
  [Console]::Error.WriteLine("prepare_data.ps1: error: $message")
  exit $status
}

$DryRun = $false
$Out = ''
$Sources = @()
foreach ($a in $args) {
  switch -Regex ($a) {
    '^--help$' { Show-Usage; exit 0 }
    '^--dry-run$' { $DryRun = $true; break }
    '^-' { Stop-Script 2 "unknown option $a (see --help)" }
    default { if ($Out -eq '') { $Out = $a } else { $Sources += $a } }
  }
}
if ($Out -eq '') { Stop-Script 2 'no output directory given (see --help)' }

$Root = Split-Path -Parent $PSScriptRoot
function Get-Setting([string]$name, [string]$default) {
  $v = [Environment]::GetEnvironmentVariable($name)
  if ([string]::IsNullOrEmpty($v)) { $default } else { $v }
}
$DataProfile = Get-Setting 'DATA_PROFILE' 'general'
$TotalTokens = Get-Setting 'TOTAL_TOKENS' '100000000'
$BytesPerToken = Get-Setting 'BYTES_PER_TOKEN' '4'
$VocabSize = Get-Setting 'VOCAB_SIZE' '50304'
$ValFraction = Get-Setting 'VAL_FRACTION' '0.05'
if ($DataProfile -notin @('general', 'coding')) {
  Stop-Script 2 "DATA_PROFILE must be general or coding, not '$DataProfile'"
}
foreach ($v in @(@('TOTAL_TOKENS', $TotalTokens), @('BYTES_PER_TOKEN', $BytesPerToken), @('VOCAB_SIZE', $VocabSize))) {
  if ($v[1] -notmatch '^[0-9]+$' -or [int64]$v[1] -eq 0) {
    Stop-Script 2 "$($v[0]) must be a positive whole number, not '$($v[1])'"
  }
}
$Budget = [int64]$TotalTokens * [int64]$BytesPerToken
$Corpus = Join-Path $Out 'corpus'
# .NET file calls resolve relative paths against the process directory, not PowerShell's location.
function Get-FullPath([string]$path) { $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($path) }

# The tinybit binary NAME: $TB_BIN/NAME, else target/release/NAME, else NAME on PATH.
$Exe = if ($env:OS -eq 'Windows_NT') { '.exe' } else { '' }
function Find-Bin([string]$name) {
  $tbBin = Get-Setting 'TB_BIN' ''
  if ($tbBin -ne '') {
    $p = Join-Path $tbBin ($name + $Exe)
    if (Test-Path -LiteralPath $p -PathType Leaf) { return $p }
    [Console]::Error.WriteLine("prepare_data.ps1: TB_BIN=$tbBin holds no $name")
  } elseif (Test-Path -LiteralPath (Join-Path $Root "target/release/$name$Exe") -PathType Leaf) {
    return (Join-Path $Root "target/release/$name$Exe")
  } elseif (Get-Command $name -CommandType Application -ErrorAction SilentlyContinue) {
    return (Get-Command $name -CommandType Application | Select-Object -First 1).Path
  }
  if ($DryRun) { return $name }
  return $null
}
$NoBin = "build it with 'cargo build --release' or set TB_BIN to the directory that holds it"

# Runs a command with its stdout sent to stderr (stdout carries only the final paths); in a dry run,
# prints it instead.
function Format-Command([string[]]$words) {
  ($words | ForEach-Object { if ($_ -match '^[A-Za-z0-9_./:=@%+,-]+$') { $_ } else { "'" + ($_ -replace "'", "''") + "'" } }) -join ' '
}
function Invoke-Step([string[]]$words) {
  if ($DryRun) {
    Write-Output (Format-Command $words)
  } else {
    $rest = @($words | Select-Object -Skip 1)
    & $words[0] @rest | ForEach-Object { [Console]::Error.WriteLine($_) }
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  }
}
function Copy-Step([string]$src, [string]$dst) {
  if ($DryRun) { Write-Output (Format-Command @('cp', $src, $dst)) } else { Copy-Item -LiteralPath $src -Destination $dst }
}

$script:Used = [int64]0
$script:Full = $false
$script:Count = 0
$script:Skipped = 0

# UTF-8 text: no NUL byte, and valid UTF-8.
$Utf8Strict = New-Object System.Text.UTF8Encoding($false, $true)
function Test-Text([string]$path) {
  $bytes = [System.IO.File]::ReadAllBytes((Get-FullPath $path))
  if ($bytes.Length -eq 0 -or [Array]::IndexOf($bytes, [byte]0) -ge 0) { return $false }
  try { [void]$Utf8Strict.GetString($bytes); return $true } catch { return $false }
}

# Copies one file into the corpus. The file that crosses the budget keeps only the whole lines of
# its first bytes (the last, maybe cut, line dropped, as sed '$d' does), and fills the corpus.
function Add-File([string]$path) {
  if ($script:Full) { return }
  if (-not (Test-Text $path)) { $script:Skipped++; return }
  $size = (Get-Item -LiteralPath $path).Length
  $left = $Budget - $script:Used
  $script:Count++
  $dst = Join-Path $Corpus (('{0:D6}' -f $script:Count) + '-' + (Split-Path -Leaf $path))
  if ($size -le $left) {
    Copy-Step $path $dst
    $script:Used += $size
    if ($script:Used -ge $Budget) { $script:Full = $true }
  } elseif ($DryRun) {
    Write-Output ("head -c $left " + (Format-Command @($path)) + " | LC_ALL=C sed '`$d' > " + (Format-Command @($dst)))
    $script:Used += $left
    $script:Full = $true
  } else {
    $bytes = [System.IO.File]::ReadAllBytes((Get-FullPath $path))
    $cut = if ($left -ge 2) { [Array]::LastIndexOf($bytes, [byte]10, [int]($left - 2)) } else { -1 }
    $stream = [System.IO.File]::Create((Get-FullPath $dst))
    $stream.Write($bytes, 0, $cut + 1)
    $stream.Close()
    $script:Used += $cut + 1
    $script:Full = $true
  }
}

# Adds a file, or the files under a directory in sorted order (hidden ones skipped) whose names
# match PATTERN (default: all).
function Get-SourceFiles([string]$dir, [string]$pattern) {
  foreach ($e in Get-ChildItem -LiteralPath $dir -Force) {
    if ($e.Name.StartsWith('.')) { continue }
    if ($e.PSIsContainer) { Get-SourceFiles $e.FullName $pattern }
    elseif ($e.Name -like $pattern) { $e.FullName }
  }
}
function Add-Source([string]$path, [string]$pattern = '*') {
  if (-not (Test-Path -LiteralPath $path)) { Stop-Script 66 "source $path does not exist" }
  if ($script:Full) { return }
  if (Test-Path -LiteralPath $path -PathType Leaf) { Add-File $path; return }
  [string[]]$files = @(Get-SourceFiles $path $pattern)
  [Array]::Sort($files, [StringComparer]::Ordinal)
  foreach ($f in $files) {
    Add-File $f
    if ($script:Full) { break }
  }
}

$TbTok = Find-Bin 'tb-tok'
if ($null -eq $TbTok) { Stop-Script 69 "tb-tok not found: $NoBin" }
$Extra = @((Get-Setting 'SOURCES' '') -split ' ' | Where-Object { $_ -ne '' })
$UrlList = @((Get-Setting 'URLS' '') -split ' ' | Where-Object { $_ -ne '' })
if ($UrlList.Count -gt 0) {
  $TbFetch = Find-Bin 'tb-fetch'
  if ($null -eq $TbFetch) { Stop-Script 69 "tb-fetch not found: $NoBin" }
}
$Tokenizer = Get-Setting 'TOKENIZER' ''
if ($Tokenizer -ne '' -and -not (Test-Path -LiteralPath $Tokenizer -PathType Leaf)) { Stop-Script 66 "TOKENIZER=$Tokenizer does not exist" }
[Console]::Error.WriteLine("prepare_data.ps1: gathering up to $Budget bytes (~$TotalTokens tokens) into $Corpus")
# The corpus directory is ours to replace only when our marker file says we made it.
if ((Test-Path -LiteralPath $Corpus) -and -not (Test-Path -LiteralPath (Join-Path $Corpus '.prepare_data'))) {
  Stop-Script 2 "$Corpus exists and was not made by prepare_data.ps1; move it away or choose another OUT_DIR"
}
if ($DryRun) { Write-Output (Format-Command @('rm', '-rf', $Corpus)) } elseif (Test-Path -LiteralPath $Corpus) { Remove-Item -LiteralPath $Corpus -Recurse -Force }
if ($DryRun) { Write-Output (Format-Command @('mkdir', '-p', $Corpus)) } else { [void](New-Item -ItemType Directory -Force -Path $Corpus) }
if ($DryRun) { Write-Output (Format-Command @('touch', (Join-Path $Corpus '.prepare_data'))) } else { [void](New-Item -ItemType File -Force -Path (Join-Path $Corpus '.prepare_data')) }
# (bash needs an idiom for empty arrays under set -u; PowerShell does not.)
foreach ($s in @($Sources + $Extra)) {
  Add-Source $s
}
foreach ($u in $UrlList) {
  if ($DryRun) {
    Invoke-Step @($TbFetch, '-q', $u)
    Write-Output '# then gather the file whose path tb-fetch prints'
  } else {
    $fetched = & $TbFetch -q $u
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
    Add-Source $fetched
  }
}
if ($Sources.Count -eq 0 -and $Extra.Count -eq 0 -and $UrlList.Count -eq 0) {
  if ($DataProfile -eq 'general') {
    Add-Source (Join-Path $Root 'tests/data/tinyshakespeare.txt')
    if (Test-Path -LiteralPath '/usr/share/doc' -PathType Container) { Add-Source '/usr/share/doc' }
  } else {
    $cargoHome = Get-Setting 'CARGO_HOME' (Join-Path $HOME '.cargo')
    $registry = Join-Path $cargoHome 'registry/src'
    # Get-Item (not Get-ChildItem) returns the matched src directories themselves.
    [string[]]$crates = @(Get-Item -Path (Join-Path $registry '*/*/src') -ErrorAction SilentlyContinue | Where-Object { $_.PSIsContainer } | ForEach-Object { $_.FullName })
    [Array]::Sort($crates, [StringComparer]::Ordinal)
    foreach ($d in $crates) {
      Add-Source $d '*.rs'
    }
  }
}
if ($script:Count -eq 0 -and -not $DryRun) {
  Stop-Script 65 'no UTF-8 text found in the sources; name some with SOURCES or arguments'
}
[Console]::Error.WriteLine("prepare_data.ps1: $($script:Count) files, $($script:Used) bytes gathered ($($script:Skipped) files skipped: not UTF-8 text)")

$TokOut = Join-Path $Out 'tokenizer.json'
if ($Tokenizer -ne '') {
  if ((Get-FullPath $Tokenizer) -ne (Get-FullPath $TokOut)) { Copy-Step $Tokenizer $TokOut }
} else {
  Invoke-Step @($TbTok, 'train', '--vocab-size', $VocabSize, '-o', $TokOut, $Corpus)
}
Invoke-Step @($TbTok, 'encode', '--tokenizer', $TokOut, '-o', (Join-Path $Out 'train.bin'),
  '--val-output', (Join-Path $Out 'val.bin'), '--val-fraction', $ValFraction, $Corpus)
Invoke-Step @($TbTok, 'count', (Join-Path $Out 'train.bin'))
Invoke-Step @($TbTok, 'count', (Join-Path $Out 'val.bin'))
if (-not $DryRun) {
  Write-Output @($TokOut, (Join-Path $Out 'train.bin'), (Join-Path $Out 'val.bin'))
}
