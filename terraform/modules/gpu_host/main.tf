locals {
  # Public SSM parameters name the current image of each flavour, so no name search can pick up
  # a look-alike image from another account (22.04 is refused by the variable's validation):
  # Canonical publishes plain Ubuntu's, AWS the Deep Learning AMIs' (the parameter's name is the
  # image's name without "Deep Learning" and "AMI": "Deep Learning Base OSS Nvidia Driver GPU
  # AMI (Ubuntu 24.04)", the x86_64 build).
  ami_parameter = {
    "ubuntu-24.04"       = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    "dlami-ubuntu-24.04" = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
  }
  ami_id = var.ami_id != null ? var.ami_id : data.aws_ssm_parameter.ami[0].insecure_value
}

# Public parameter: reading it needs ssm:GetParameter on arn:aws:ssm:<region>::parameter/aws/service/*
data "aws_ssm_parameter" "ami" {
  count = var.ami_id == null ? 1 : 0

  name = local.ami_parameter[var.ami_flavor]
}

data "aws_partition" "current" {}

# ---- identity: SSM for break-glass access, the model bucket as a shared weights cache ------

resource "aws_iam_role" "this" {
  name_prefix = "${var.name}-gpu-host-"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.this.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# The models role's fetcher (models_s3_cache) reads a pinned revision from the bucket, or fetches
# it from the hub and uploads it for the other hosts. Reads anywhere in the bucket; writes under
# the cache prefix only, and never deletes (the bucket is versioned: an overwrite keeps the old
# version). ListBucket makes a missing manifest a 404 (a cache miss) instead of a 403.
resource "aws_iam_role_policy" "model_bucket_cache" {
  count = var.enable_model_bucket_access ? 1 : 0

  name = "model-bucket-cache"
  role = aws_iam_role.this.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = ["s3:ListBucket", "s3:GetBucketLocation"], Resource = var.model_bucket_arn },
      { Effect = "Allow", Action = ["s3:GetObject", "s3:GetObjectVersion"], Resource = "${var.model_bucket_arn}/*" },
      {
        Effect   = "Allow"
        Action   = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
        Resource = "${var.model_bucket_arn}/${var.model_bucket_write_prefix}/*"
      },
    ]
  })
}

moved {
  from = aws_iam_role_policy.model_bucket_read
  to   = aws_iam_role_policy.model_bucket_cache
}

# Let's Encrypt on a single host (no load balancer): certbot's Route53 plugin answers the DNS-01
# challenge with the instance role's credentials, so port 80 stays closed. It lists the zones to
# find the one of the name (ListHostedZones cannot be narrowed to a zone), writes and removes
# the TXT record, and polls the change until it is in sync (GetChange, on change IDs only).
# Writes are limited to the deployment's zone, and there to TXT records named
# _acme-challenge.<domain>: the host cannot repoint the API's own A record or touch others.
resource "aws_iam_role_policy" "letsencrypt_dns" {
  count = var.letsencrypt_domain != null ? 1 : 0

  name = "letsencrypt-dns-route53"
  role = aws_iam_role.this.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Sid = "FindTheZone", Effect = "Allow", Action = "route53:ListHostedZones", Resource = "*" },
      {
        Sid      = "WaitForTheChange"
        Effect   = "Allow"
        Action   = "route53:GetChange"
        Resource = "arn:${data.aws_partition.current.partition}:route53:::change/*"
      },
      {
        Sid      = "WriteTheChallengeRecord"
        Effect   = "Allow"
        Action   = "route53:ChangeResourceRecordSets"
        Resource = "arn:${data.aws_partition.current.partition}:route53:::hostedzone/${coalesce(var.letsencrypt_zone_id, "-")}"
        Condition = {
          "ForAllValues:StringEquals" = {
            "route53:ChangeResourceRecordSetsNormalizedRecordNames" = ["_acme-challenge.${coalesce(var.letsencrypt_domain, "-")}"]
            "route53:ChangeResourceRecordSetsRecordTypes"           = ["TXT"]
            "route53:ChangeResourceRecordSetsActions"               = ["UPSERT", "DELETE"]
          }
        }
      },
    ]
  })
}

resource "aws_iam_instance_profile" "this" {
  name_prefix = "${var.name}-gpu-host-"
  role        = aws_iam_role.this.name
}

resource "aws_key_pair" "this" {
  key_name_prefix = "${var.name}-"
  public_key      = trimspace(var.ssh_public_key)
}

# ---- hosts ---------------------------------------------------------------------------------

resource "aws_instance" "this" {
  count = var.host_count

  ami                    = local.ami_id
  instance_type          = var.instance_type
  subnet_id              = var.subnets[count.index % length(var.subnets)].id
  vpc_security_group_ids = var.security_group_ids
  key_name               = aws_key_pair.this.key_name
  iam_instance_profile   = aws_iam_instance_profile.this.name
  monitoring             = var.detailed_monitoring
  ebs_optimized          = true

  metadata_options {
    http_endpoint = "enabled"
    http_tokens   = "required" # IMDSv2 only: a stolen-request SSRF cannot read the role's credentials
    # 1 hop: nothing on the host runs in containers that would need to reach the metadata service
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    encrypted             = true
    delete_on_termination = true
    tags                  = { Name = "${var.name}-gpu-${count.index}-root" }
  }

  tags = {
    Name = "${var.name}-gpu-${count.index}"
    # stack.aws_ops and the aws_ec2 inventory find the hosts by Project (provider default tag) and Role
    Role    = "gpu-host"
    SshUser = var.ssh_user
  }

  lifecycle {
    # The AMI lookup follows the newest image, and the key pair only seeds the first login
    # (later keys are managed on the host): neither may silently replace a configured host.
    # Set ami_id and taint the host to move on deliberately.
    ignore_changes = [ami, key_name]
  }
}

resource "aws_ebs_volume" "models" {
  count = var.host_count
  #checkov:skip=CKV_AWS_189:encrypted with the account's AWS-managed EBS key; it holds downloadable model weights, and a customer key would add cost and a key policy to run

  # the zone comes from the subnet, not the instance, so replacing a host keeps its weights
  availability_zone = var.subnets[count.index % length(var.subnets)].availability_zone
  type              = "gp3"
  size              = var.models_volume_size_gb
  encrypted         = true

  tags = { Name = "${var.name}-gpu-${count.index}-models" }
}

resource "aws_volume_attachment" "models" {
  count = var.host_count

  # shows up as an NVMe device on Nitro instances; Ansible finds it by the volume ID
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.models[count.index].id
  instance_id = aws_instance.this[count.index].id
  # detaching a mounted volume from a running host can hang or corrupt it
  stop_instance_before_detaching = true
}

# Elastic IPs keep each host's address (and DNS name) across stop/start.
resource "aws_eip" "this" {
  count = var.host_count

  domain   = "vpc"
  instance = aws_instance.this[count.index].id

  tags = { Name = "${var.name}-gpu-${count.index}" }
}
