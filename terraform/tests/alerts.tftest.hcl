# The alerts module on its own and in the root: an encrypted topic, an optional e-mail
# subscription, and the hosts' role allowed to publish to that topic only.

mock_provider "aws" {
  source = "./tests/mocks"
}

# the mock would invent a random string; the policy needs an ARN to check
override_resource {
  target = module.alerts.aws_sns_topic.this
  values = { arn = "arn:aws:sns:us-east-1:123456789012:llm-alerts" }
}

override_resource {
  target = aws_sns_topic.this
  values = { arn = "arn:aws:sns:us-east-1:123456789012:llm-alerts" }
}

variables {
  admin_cidrs    = ["203.0.113.7/32"]
  ssh_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy test@example"
}

run "module_defaults_an_encrypted_topic_no_subscription_publish_only" {
  module {
    source = "./modules/alerts"
  }

  variables {
    name           = "llm"
    region         = "us-east-1"
    host_role_name = "llm-gpu-host-role"
  }

  assert {
    condition     = aws_sns_topic.this.name == "llm-alerts" && aws_sns_topic.this.kms_master_key_id == "alias/aws/sns"
    error_message = "the topic is <name>-alerts, encrypted with the AWS-managed SNS key by default"
  }
  assert {
    condition     = length(aws_sns_topic_subscription.email) == 0 && output.email_subscription == null
    error_message = "no alert_email: no subscription"
  }
  assert {
    condition     = length(aws_vpc_security_group_egress_rule.smtp) == 0
    error_message = "SNS needs no port beyond 443: no SMTP egress by default"
  }
  assert {
    condition     = aws_iam_role_policy.publish.role == "llm-gpu-host-role"
    error_message = "the publish policy belongs to the hosts' role"
  }
  assert {
    condition = jsondecode(aws_iam_role_policy.publish.policy).Statement == [{
      Effect = "Allow", Action = "sns:Publish", Resource = "arn:aws:sns:us-east-1:123456789012:llm-alerts"
    }]
    error_message = "the hosts may do exactly one thing: sns:Publish to this topic (no wildcard, no other action)"
  }
  assert {
    condition     = output.topic_arn == "arn:aws:sns:us-east-1:123456789012:llm-alerts"
    error_message = "the module's output is the topic's ARN"
  }
}

run "module_email_subscription_and_customer_key" {
  module {
    source = "./modules/alerts"
  }

  variables {
    name           = "llm"
    region         = "eu-west-1"
    host_role_name = "llm-gpu-host-role"
    alert_email    = "oncall@example.com"
    kms_key_arn    = "arn:aws:kms:eu-west-1:123456789012:key/0b1c2d3e-aaaa-bbbb-cccc-000000000000"
  }

  assert {
    condition = (
      length(aws_sns_topic_subscription.email) == 1 &&
      aws_sns_topic_subscription.email[0].protocol == "email" &&
      aws_sns_topic_subscription.email[0].endpoint == "oncall@example.com" &&
      aws_sns_topic_subscription.email[0].topic_arn == "arn:aws:sns:us-east-1:123456789012:llm-alerts"
    )
    error_message = "alert_email must subscribe that address to the topic by e-mail"
  }
  assert {
    condition     = aws_sns_topic.this.kms_master_key_id == "arn:aws:kms:eu-west-1:123456789012:key/0b1c2d3e-aaaa-bbbb-cccc-000000000000"
    error_message = "a customer key must encrypt the topic"
  }
  assert {
    condition = jsondecode(aws_iam_role_policy.publish.policy).Statement == [
      { Effect = "Allow", Action = "sns:Publish", Resource = "arn:aws:sns:us-east-1:123456789012:llm-alerts" },
      {
        Effect    = "Allow", Action = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource  = "arn:aws:kms:eu-west-1:123456789012:key/0b1c2d3e-aaaa-bbbb-cccc-000000000000"
        Condition = { StringEquals = { "kms:ViaService" = "sns.eu-west-1.amazonaws.com" } }
      },
    ]
    error_message = "with a customer key the hosts may use that key through SNS only, besides publishing"
  }
}

run "root_creates_the_topic_for_the_hosts_role_and_outputs_its_arn" {
  variables {
    alert_email = "oncall@example.com"
  }

  assert {
    condition     = output.alert_topic_arn == "arn:aws:sns:us-east-1:123456789012:llm-alerts"
    error_message = "the root must output the topic's ARN for the inventory"
  }
  assert {
    condition     = module.alerts.email_subscription == "oncall@example.com"
    error_message = "the root's alert_email must reach the module"
  }
}

run "module_opens_the_smtp_port_for_the_email_receiver_only_when_asked" {
  command = plan

  module {
    source = "./modules/alerts"
  }

  variables {
    name                   = "llm"
    region                 = "us-east-1"
    host_role_name         = "llm-gpu-host-role"
    host_security_group_id = "sg-0123456789abcdef0"
    smtp_port              = 587
  }

  assert {
    condition = (
      length(aws_vpc_security_group_egress_rule.smtp) == 1 &&
      aws_vpc_security_group_egress_rule.smtp[0].security_group_id == "sg-0123456789abcdef0" &&
      aws_vpc_security_group_egress_rule.smtp[0].from_port == 587 &&
      aws_vpc_security_group_egress_rule.smtp[0].to_port == 587 &&
      aws_vpc_security_group_egress_rule.smtp[0].ip_protocol == "tcp"
    )
    error_message = "smtp_port must open exactly that TCP port outbound from the hosts' group"
  }
}

run "root_refuses_a_malformed_alert_email" {
  command = plan

  variables {
    alert_email     = "oncall at example.com"
    alert_smtp_port = 8080
  }

  expect_failures = [var.alert_email, var.alert_smtp_port]
}
