# Trains a tinybit model on one NVIDIA L4 in Google Cloud: uploads the source, configs and data
# to a bucket, creates a g2-standard-8 VM from a Deep Learning VM image whose startup script
# (scripts/cloud/startup.sh) builds tb-train with CUDA, runs `tb-train --resume` under systemd, syncs
# the run directory back to the bucket and powers the VM off when training is done.
# scripts/gcp_launch.sh is the same script, line for line, for bash.
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Show-Usage {
  @'
Usage: pwsh scripts/gcp_launch.ps1 --bucket gs://NAME [options]
       pwsh scripts/gcp_launch.ps1 --restart --bucket gs://NAME [--name NAME] [--zone ZONE] [--project ID]

Creates an L4 VM that trains a model and writes its run directory to gs://NAME/RUN/run/.

Options (--flag VALUE or --flag=VALUE):
  --project ID          Google Cloud project (default: gcloud's configured project)
  --zone ZONE           zone with L4 GPUs (default us-central1-a)
  --bucket gs://NAME    bucket for source, configs, data and checkpoints; created when missing
  --name NAME           VM name and run name (default tinybit-MODEL, e.g. tinybit-micro)
  --model-config FILE   model architecture (default configs/micro.toml)
  --train-config FILE   training settings (default configs/train-micro-l4.toml)
  --data DIR            directory with tokenizer.json, train.bin and val.bin (default data),
                        made by scripts/prepare_data.ps1
  --set KEY=VALUE       passed on to tb-train as --set KEY=VALUE (repeatable)
  --spot                a Spot VM: much cheaper, but Google may stop it at any time; it keeps its
                        disk, and --restart (from a scheduled task) starts it again to resume
  --machine-type TYPE   default g2-standard-8 (8 vCPUs, 32 GB, one L4)
  --image-family NAME   Deep Learning VM image family with CUDA
                        (default common-cu128-ubuntu-2204-nvidia-570)
  --disk-size GB        boot disk size (default 100)
  --restart             start the stopped VM again unless its run is done, then exit (for cron)
  --dry-run             print the commands it would run, run nothing
  --help                print this help

Needs gcloud (logged in: gcloud auth login) and tar. Exit status: 0 done, 2 usage error,
66 a config or data file is missing, 69 gcloud not found; a failing gcloud passes its status on.
'@
}

function Stop-Script([int]$status, [string]$message) {
  [Console]::Error.WriteLine("gcp_launch.ps1: error: $message")
  exit $status
}

$Root = Split-Path -Parent $PSScriptRoot
$DryRun = $false
$Restart = $false
$Spot = $false
$Project = ''
$Zone = 'us-central1-a'
$Bucket = ''
$Name = ''
$ModelConfig = 'configs/micro.toml'
$TrainConfig = 'configs/train-micro-l4.toml'
$Data = 'data'
$MachineType = 'g2-standard-8'
$ImageFamily = 'common-cu128-ubuntu-2204-nvidia-570'
$DiskSize = '100'
$Sets = @()
$argv = [System.Collections.Generic.List[string]]::new([string[]]$args)
while ($argv.Count -gt 0) {
  $a = $argv[0]
  if ($a -match '^(--[^=]+)=(.*)$') { $argv[0] = $Matches[2]; $argv.Insert(0, $Matches[1]); continue }
  switch ($a) {
    '--help' { Show-Usage; exit 0 }
    '--dry-run' { $DryRun = $true }
    '--restart' { $Restart = $true }
    '--spot' { $Spot = $true }
    { $_ -in @('--project', '--zone', '--bucket', '--name', '--model-config', '--train-config', '--data', '--set', '--machine-type', '--image-family', '--disk-size') } {
      if ($argv.Count -lt 2) { Stop-Script 2 "$a needs a value (see --help)" }
      $v = $argv[1]
      switch ($a) {
        '--project' { $Project = $v }
        '--zone' { $Zone = $v }
        '--bucket' { $Bucket = $v }
        '--name' { $Name = $v }
        '--model-config' { $ModelConfig = $v }
        '--train-config' { $TrainConfig = $v }
        '--data' { $Data = $v }
        '--set' { $Sets += $v }
        '--machine-type' { $MachineType = $v }
        '--image-family' { $ImageFamily = $v }
        '--disk-size' { $DiskSize = $v }
      }
      $argv.RemoveAt(0) }
    default { Stop-Script 2 "unknown argument $a (see --help)" }
  }
  $argv.RemoveAt(0)
}
if ($Bucket -eq '') { Stop-Script 2 '--bucket gs://NAME is required (see --help)' }
$Bucket = 'gs://' + ($Bucket -replace '^gs://', '')
$Bucket = $Bucket.TrimEnd('/')
if ($Name -eq '') {
  $Name = 'tinybit-' + [System.IO.Path]::GetFileNameWithoutExtension($ModelConfig)
}
if ($Name -cnotmatch '^[a-z]') {
  Stop-Script 2 "--name must start with a lower-case letter (a VM name), not '$Name'"
}
$Prefix = "$Bucket/$Name"
# gcloud's own flags: the project (when given) for every command, and the zone for the VM's.
$Proj = @()
if ($Project -ne '') { $Proj = @("--project=$Project") }
$Where = @("--zone=$Zone") + $Proj

# Prints words as a shell command line, quoting only the words that need it.
function Format-Command([string[]]$words) {
  ($words | ForEach-Object { if ($_ -match '^[A-Za-z0-9_./:=@%+,-]+$') { $_ } else { "'" + ($_ -replace "'", "''") + "'" } }) -join ' '
}

# Runs a command; in a dry run, prints it instead.
function Invoke-Step([string[]]$words) {
  if ($DryRun) {
    Write-Output (Format-Command $words)
  } else {
    $rest = @($words | Select-Object -Skip 1)
    & $words[0] @rest
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  }
}

if (-not $DryRun -and -not (Get-Command gcloud -ErrorAction SilentlyContinue)) {
  Stop-Script 69 'gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and run gcloud auth login'
}

if ($Restart) {
  # After a Spot preemption the VM is stopped with its disk; starting it resumes training. A run
  # that finished (or failed for good) is marked in the bucket and not started again.
  foreach ($mark in @('DONE', 'FAILED')) {
    if (-not $DryRun) {
      & gcloud storage ls "$Prefix/run/$mark" *> $null
      if ($LASTEXITCODE -eq 0) {
        [Console]::Error.WriteLine("gcp_launch.ps1: $Prefix/run/$mark exists; not starting $Name")
        exit 0
      }
    }
  }
  Invoke-Step (@('gcloud', 'compute', 'instances', 'start', $Name) + $Where)
  exit 0
}

foreach ($f in @($ModelConfig, $TrainConfig, "$Data/tokenizer.json", "$Data/train.bin", "$Data/val.bin")) {
  if (-not (Test-Path -LiteralPath $f -PathType Leaf)) {
    if (-not $DryRun) { Stop-Script 66 "$f does not exist (data comes from scripts/prepare_data.ps1)" }
    [Console]::Error.WriteLine("gcp_launch.ps1: warning: $f does not exist")
  }
}

$Stage = Join-Path ([System.IO.Path]::GetTempPath()) ('tinybit-' + [guid]::NewGuid())
[void](New-Item -ItemType Directory -Path $Stage)
try {
  # The tb-train --set overrides travel in the bucket, one per line.
  [System.IO.File]::WriteAllText((Join-Path $Stage 'set.txt'), (($Sets | ForEach-Object { "$_`n" }) -join ''))
  if ($DryRun) {
    Write-Output "cat > $(Join-Path $Stage 'set.txt') <<'EOF'"
    foreach ($kv in $Sets) { Write-Output $kv }
    Write-Output 'EOF'
  }

  $exists = $false
  if (-not $DryRun) { & gcloud storage buckets describe $Bucket *> $null; $exists = ($LASTEXITCODE -eq 0) }
  if (-not $exists) {
    if ($DryRun) { Write-Output '# when the bucket does not exist yet:' }
    Invoke-Step (@('gcloud', 'storage', 'buckets', 'create', $Bucket, "--location=$($Zone -replace '-[^-]*$', '')") + $Proj)
  }
  # The working tree as it is (uncommitted changes included), without build outputs and data.
  Invoke-Step @('tar', '-czf', (Join-Path $Stage 'tinybit-src.tar.gz'), '-C', $Root, '--exclude=./target', '--exclude=./data', '--exclude=./runs', '--exclude=./.git', '.')
  Invoke-Step @('gcloud', 'storage', 'cp', (Join-Path $Stage 'tinybit-src.tar.gz'), "$Prefix/src/tinybit-src.tar.gz")
  Invoke-Step @('gcloud', 'storage', 'cp', $ModelConfig, "$Prefix/config/model.toml")
  Invoke-Step @('gcloud', 'storage', 'cp', $TrainConfig, "$Prefix/config/train.toml")
  Invoke-Step @('gcloud', 'storage', 'cp', (Join-Path $Stage 'set.txt'), "$Prefix/config/set.txt")
  Invoke-Step @('gcloud', 'storage', 'cp', "$Data/tokenizer.json", "$Data/train.bin", "$Data/val.bin", "$Prefix/data/")

  # The commas are gcloud's, inside single arguments.
  $Create = @('gcloud', 'compute', 'instances', 'create', $Name) + $Where + @(
    "--machine-type=$MachineType",
    '--accelerator=type=nvidia-l4,count=1',
    '--maintenance-policy=TERMINATE',
    "--image-family=$ImageFamily",
    '--image-project=deeplearning-platform-release',
    "--boot-disk-size=$($DiskSize)GB",
    '--scopes=cloud-platform',
    "--metadata=install-nvidia-driver=True,tinybit-bucket=$Bucket,tinybit-run=$Name",
    "--metadata-from-file=startup-script=$(Join-Path $Root 'scripts/cloud/startup.sh')")
  if ($Spot) {
    $Create += @('--provisioning-model=SPOT', '--instance-termination-action=STOP')
  }
  Invoke-Step $Create
} finally {
  Remove-Item -LiteralPath $Stage -Recurse -Force
}

if ($DryRun) { exit 0 }
[Console]::Error.WriteLine(@"
gcp_launch.ps1: $Name is starting; the first boot builds tinybit (about 10 minutes).
  progress:    gcloud storage cat $Prefix/run/train.jsonl | Select-Object -Last 3
  live log:    gcloud compute ssh $Name $($Where -join ' ') -- journalctl -fu tinybit-train
  checkpoints: gcloud storage ls $Prefix/run/
  after a Spot preemption, from a scheduled task every 15 minutes (cron: */15 * * * *):
    pwsh $Root/scripts/gcp_launch.ps1 --restart --bucket $Bucket --name $Name $($Where -join ' ')
  when done:   gcloud compute instances delete $Name $($Where -join ' ')
"@)
